"""Shared fixtures: a seeded rng, the ISA fixture, and the one tolerance table.

Every kernel result is judged against ``sdpa.reference`` run on float64-upcast inputs with
``assert_matches_reference``; its tolerance depends only on the output dtype.
"""

import zlib

import numpy as np
import pytest
from hypothesis import settings
from threadpoolctl import threadpool_limits

import sdpa
from sdpa import _config
from sdpa import reference as _reference

# The reference's float64 matmuls are tiny; BLAS threads only slow them down (10-20x on a
# loaded 2-core machine), and sdpa's own pool is what the tests exercise.
_blas_limit = threadpool_limits(limits=1, user_api="blas")

# Modest by default so the suite stays fast; `pytest --hypothesis-profile=thorough` digs deeper.
settings.register_profile("sdpa", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile("sdpa")

# Relative tolerance per output dtype. Errors are measured against the largest expected value
# (elementwise) or as ||actual - expected|| / ||expected|| (large outputs).
TOLERANCE = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 5e-3,  # output rounded to float16 (eps 9.8e-4), accumulation in float32
    "bfloat16": 2e-2,  # output rounded to bfloat16 (eps 7.8e-3), accumulation in float32
}
# Outputs with more elements than this are compared by relative-norm error.
LARGE = 1 << 16


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).name]


def reference(query, key, value, attn_mask=None, **kwargs):
    """sdpa.reference on float64-upcast inputs (the mask keeps its kind: bool stays bool)."""

    def up(x):
        return np.asarray(x).astype(np.float64)

    if attn_mask is not None and np.asarray(attn_mask).dtype != np.bool_:
        attn_mask = up(attn_mask)
    return _reference.scaled_dot_product_attention(
        up(query), up(key), up(value), attn_mask, **kwargs
    )


def assert_matches_reference(actual, expected, dtype):
    """Check a kernel result of ``dtype`` against the float64 reference ``expected``."""
    dtype = np.dtype(dtype)
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert not np.isnan(a).any(), "NaN in the kernel output"
    if a.size == 0:
        return
    tol = tolerance(dtype)
    if a.size > LARGE:
        norm = np.linalg.norm(b)
        err = np.linalg.norm(a - b) / norm if norm > 0 else np.linalg.norm(a)
        assert err <= tol, f"relative-norm error {err:.3g} > {tol:.3g} ({dtype})"
    else:
        # Attention outputs are convex combinations of value rows, so the error scale is the
        # magnitude of the outputs, not each element (which may sit near 0 by cancellation).
        atol = tol * np.max(np.abs(b))
        err = np.abs(a - b)
        worst = np.unravel_index(np.argmax(err - tol * np.abs(b)), err.shape)
        assert np.all(err <= atol + tol * np.abs(b)), (
            f"max error {err[worst]:.3g} at {worst}: got {a[worst]!r}, expected {b[worst]!r} "
            f"(atol {atol:.3g}, rtol {tol:.3g}, {dtype})"
        )


def check(query, key, value, attn_mask=None, **kwargs):
    """Run the kernel and compare it with the reference; return the kernel's output."""
    actual = sdpa.scaled_dot_product_attention(query, key, value, attn_mask, **kwargs)
    expected = reference(
        query, key, value, attn_mask, **{k: v for k, v in kwargs.items() if k != "out"}
    )
    assert_matches_reference(actual, expected, np.result_type(query, key, value))
    return actual


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different for each test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=_config.available_isas())
def isa(request):
    """Run the test under each kernel variant this CPU supports."""
    previous = _config.isa()
    _config.set_isa(request.param)
    assert _config.isa() == request.param
    yield request.param
    _config.set_isa(previous)
