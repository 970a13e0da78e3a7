"""Shared fixtures: a seeded rng, the ISA fixture, and the one tolerance table.

Every kernel result is judged against ``sdpa.reference`` run on float64-upcast inputs with
``assert_matches_reference``; its tolerance depends only on the output dtype.
"""

import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import sdpa
from sdpa import _config
from sdpa import reference as _reference

# The reference's float64 matmuls are tiny; BLAS threads only slow them down (10-20x on a
# loaded 2-core machine), and sdpa's own pool is what the tests exercise.
_blas_limit = threadpool_limits(limits=1, user_api="blas")

# Modest and derandomized by default, so the suite stays fast and CI judges every commit on the
# same examples; `pytest --hypothesis-profile=thorough` digs deeper on fresh random examples (it
# found the ALiBi and cancellation cases pinned in test_variants.py and test_basic.py).
settings.register_profile("sdpa", max_examples=60, deadline=None, print_blob=True, derandomize=True)
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
ALIGNMENTS = ["top_left", "bottom_right"]

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


def assert_matches_reference(actual, expected, dtype, magnitude=None):
    """Check a kernel result of ``dtype`` against the float64 reference ``expected``.

    ``magnitude``, optional, is a callable returning the reference output for ``|value|``: the
    size of what each output element sums. Outputs that cancel to near 0 (few elements, many keys)
    are then judged against it rather than against themselves (see below)."""
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
        # When every output element cancels (one value column over a thousand keys, say), that
        # magnitude is itself small, and the standard bound of a float sum applies instead: the
        # error scale is sum_j p_j |v_j|, the attention output over |v| (never below |out|).
        atol = tol * np.max(np.abs(b))
        # An output below the compute type's smallest normal number (weights that underflow in
        # it, e.g. every key far below an attention sink), or below the output type's smallest
        # subnormal step, has no relative precision to judge.
        compute = np.float64 if dtype == np.float64 else np.float32
        finfo = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
        atol = max(atol, float(np.finfo(compute).tiny), float(finfo.smallest_subnormal))
        err = np.abs(a - b)
        if magnitude is not None and not np.all(err <= atol + tol * np.abs(b)):
            atol = max(atol, tol * float(np.max(np.asarray(magnitude(), dtype=np.float64))))
        worst = np.unravel_index(np.argmax(err - tol * np.abs(b)), err.shape)
        assert np.all(err <= atol + tol * np.abs(b)), (
            f"max error {err[worst]:.3g} at {worst}: got {a[worst]!r}, expected {b[worst]!r} "
            f"(atol {atol:.3g}, rtol {tol:.3g}, {dtype})"
        )


def check(query, key, value, attn_mask=None, **kwargs):
    """Run the kernel and compare it with the reference; return the kernel's output."""
    actual = sdpa.scaled_dot_product_attention(query, key, value, attn_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "out"}
    expected = reference(query, key, value, attn_mask, **kwargs)
    assert_matches_reference(
        actual,
        expected,
        np.result_type(query, key, value),
        lambda: reference(query, key, np.abs(np.asarray(value)), attn_mask, **kwargs),
    )
    return actual


def pytest_report_header(config):
    """The kernel variant, thread count and versions under test, at the top of every run."""
    import platform

    info = sdpa._core.kernel_info() or {}
    return [
        f"sdpa {sdpa.__version__}: isa {_config.isa()} (available: "
        f"{', '.join(_config.available_isas())}), {sdpa.get_num_threads()} threads",
        f"sdpa kernel build: {info.get('compile_info', '?')}",
        f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}",
    ]


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


# attention_weights and return_lse judges, and the random-variant strategy, shared by several files


def reference_weights(query, key, attn_mask=None, **kwargs):
    """reference.attention_weights on float64-upcast inputs (a bool mask stays bool)."""

    def up(x):
        return np.asarray(x).astype(np.float64)

    if attn_mask is not None and np.asarray(attn_mask).dtype != np.bool_:
        attn_mask = up(attn_mask)
    return _reference.attention_weights(up(query), up(key), attn_mask=attn_mask, **kwargs)


def check_weights(query, key, attn_mask=None, **kwargs):
    """Run sdpa.attention_weights, judge it by the reference, check the row sums; return it."""
    weights = sdpa.attention_weights(query, key, attn_mask=attn_mask, **kwargs)
    expected = reference_weights(query, key, attn_mask, **kwargs)
    dtype = np.result_type(query, key)
    assert_matches_reference(weights, expected, dtype)
    assert np.all(weights >= 0)
    sums = weights.astype(np.float64).sum(axis=-1)
    has_key = expected.sum(axis=-1) > 0
    assert np.all(weights[~has_key] == 0), "a row with no key has nonzero weights"
    # rounding each weight to `dtype` moves the sum by at most half an ulp of 1
    np.testing.assert_allclose(sums[has_key], 1.0, rtol=0, atol=tolerance(dtype))
    return weights


# Absolute lse tolerance (scaled by max(1, |lse|)), by the dtype the lse is returned in, which is
# the accumulation dtype: the inputs are exact in it, so only the accumulation rounds.
LSE_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def lse_dtype(dtype):
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def assert_lse_matches(actual, expected, dtype):
    """Check the kernel's lse (for a result of ``dtype``) against the float64 reference lse."""
    want = lse_dtype(dtype)
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype == want, f"lse dtype {actual.dtype}, expected {want}"
    assert actual.shape == expected.shape, f"lse shape {actual.shape}, expected {expected.shape}"
    a = actual.astype(np.float64)
    assert not np.isnan(a).any(), "NaN in the lse"
    empty = expected == -np.inf
    np.testing.assert_array_equal(a == -np.inf, empty, err_msg="lse -inf pattern")
    if (~empty).any():
        tol = LSE_TOLERANCE[want.name] * max(1.0, np.max(np.abs(expected[~empty])))
        err = np.max(np.abs(a[~empty] - expected[~empty]))
        assert err <= tol, f"lse max error {err:.3g} > {tol:.3g} ({dtype})"


def check_lse(query, key, value, attn_mask=None, **kwargs):
    """Run the kernel with return_lse=True; judge out and lse by the reference; return both.

    Also checks that rows with no key left are exactly 0 in the output."""
    result = sdpa.scaled_dot_product_attention(
        query, key, value, attn_mask, return_lse=True, **kwargs
    )
    assert isinstance(result, tuple) and len(result) == 2, type(result)
    out, lse = result
    kwargs.pop("out", None)
    ref_out, ref_lse = reference(query, key, value, attn_mask, return_lse=True, **kwargs)
    dtype = np.result_type(query, key, value)
    assert_matches_reference(
        out,
        ref_out,
        dtype,
        lambda: reference(query, key, np.abs(np.asarray(value)), attn_mask, **kwargs),
    )
    assert_lse_matches(lse, ref_lse, dtype)
    empty = np.broadcast_to((ref_lse == -np.inf)[..., None], out.shape)
    assert np.all(out[empty] == 0), "a row with no key is not exactly 0"
    return out, lse


# A window side: unbounded, small or wide.
sides = st.one_of(st.none(), st.integers(0, 8), st.integers(0, 400))


@st.composite
def variant_problems(draw, dtypes=(np.float16, np.float32, np.float64)):
    """(q, k, v, mask, kwargs): random shapes, GQA, mask and every variant argument."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(dtypes))
    if draw(st.integers(0, 9)) == 0:  # now and then a decode shape on the split-K path
        L, S = draw(st.integers(1, 3)), draw(st.integers(1024, 1500))
    else:
        L, S = draw(st.integers(1, 90)), draw(st.integers(1, 300))
    e = draw(st.integers(1, 20))
    b, hkv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    gqa = draw(st.booleans())
    hq = hkv * draw(st.integers(1, 3)) if gqa else hkv
    q = rng.standard_normal((b, hq, L, e)).astype(dtype)
    k = rng.standard_normal((b, hkv, S, e)).astype(dtype)
    v = rng.standard_normal((b, hkv, S, draw(st.integers(1, 9)))).astype(dtype)

    mask = None
    kind = draw(st.sampled_from(["none", "none", "bool", "float"]))
    if kind != "none":
        shape = draw(st.sampled_from([(L, S), (b, hq, L, S), (1, S), (hq, 1, S)]))
        if kind == "bool":
            mask = rng.random(shape) < draw(st.floats(0.3, 1.0))
        else:
            mask = rng.standard_normal(shape).astype(np.float32)
            mask[rng.random(shape) < draw(st.floats(0.0, 0.3))] = -np.inf

    head_shapes = [(hq,), (b, hq), (b, 1), ()]
    kwargs = {
        "enable_gqa": gqa,
        "is_causal": draw(st.booleans()),
        "alignment": draw(st.sampled_from(ALIGNMENTS)),
    }
    if draw(st.booleans()):
        kwargs["window"] = (draw(sides), draw(sides))
    if draw(st.booleans()):
        kwargs["alibi_slopes"] = rng.uniform(0, 1, draw(st.sampled_from(head_shapes)))
    if draw(st.booleans()):
        kwargs["softcap"] = draw(st.floats(0.1, 50.0))
    if draw(st.booleans()):
        kwargs["kv_lengths"] = rng.integers(0, S + 1, draw(st.sampled_from(head_shapes)))
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(-2.0, 2.0, allow_nan=False))
    return q, k, v, mask, kwargs
