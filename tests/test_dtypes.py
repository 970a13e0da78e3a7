"""float16, float32 and float64 in and out; mixed dtypes promote by NumPy rules; out=."""

import numpy as np
import pytest
from conftest import check, reference

import sdpa

FLOATS = [np.float16, np.float32, np.float64]
float_id = lambda d: np.dtype(d).name  # noqa: E731


@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
@pytest.mark.parametrize(
    "L,S", [(1, 1000), (65, 129), (130, 300), (1000, 64)], ids=lambda x: str(x)
)
def test_each_dtype(isa, rng, dtype, L, S):
    q = rng.standard_normal((2, L, 32)).astype(dtype)
    k = rng.standard_normal((2, S, 32)).astype(dtype)
    v = rng.standard_normal((2, S, 24)).astype(dtype)
    out = check(q, k, v)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_each_dtype_with_mask_and_causal(isa, rng, dtype):
    q = rng.standard_normal((2, 70, 16)).astype(dtype)
    k = rng.standard_normal((2, 300, 16)).astype(dtype)
    v = rng.standard_normal((2, 300, 16)).astype(dtype)
    check(q, k, v, rng.random((70, 300)) < 0.5, is_causal=True)
    check(q, k, v, rng.standard_normal((70, 300)).astype(dtype), is_causal=True)


def test_float64_is_computed_in_float64(isa, rng):
    # differences far below float32 resolution must survive
    q = rng.standard_normal((3, 40, 16))
    k = rng.standard_normal((3, 90, 16))
    v = 1.0 + 1e-12 * rng.standard_normal((3, 90, 8))
    out = check(q, k, v)
    assert np.ptp(out) > 1e-14


def test_float16_accumulates_in_float32(isa, rng):
    # S = 4096 uniform weights: a float16 running sum would be off by far more than the tolerance
    q = np.zeros((2, 3, 16), np.float16)
    k = rng.standard_normal((2, 4096, 16)).astype(np.float16)
    v = rng.uniform(0.5, 1.5, (2, 4096, 8)).astype(np.float16)
    check(q, k, v)


def test_float16_large_scores(isa, rng):
    # q.k up to ~1e5 overflows float16, not float32
    q = (60 * rng.standard_normal((2, 20, 64))).astype(np.float16)
    k = (60 * rng.standard_normal((2, 70, 64))).astype(np.float16)
    v = rng.standard_normal((2, 70, 8)).astype(np.float16)
    out = check(q, k, v, scale=1.0)
    assert np.all(np.isfinite(out))


MIXED = [
    (np.float16, np.float32, np.float32),
    (np.float32, np.float16, np.float16),
    (np.float16, np.float16, np.float64),
    (np.float32, np.float64, np.float32),
    (np.float64, np.float16, np.float32),
]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda ds: "-".join(float_id(d) for d in ds))
def test_mixed_dtypes_promote(isa, rng, dtypes):
    q = rng.standard_normal((2, 33, 16)).astype(dtypes[0])
    k = rng.standard_normal((2, 70, 16)).astype(dtypes[1])
    v = rng.standard_normal((2, 70, 8)).astype(dtypes[2])
    out = check(q, k, v)
    assert out.dtype == np.result_type(*dtypes)


@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_out_receives_the_result(isa, rng, dtype):
    q = rng.standard_normal((2, 3, 65, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, 70, 16)).astype(dtype)
    v = rng.standard_normal((2, 3, 70, 8)).astype(dtype)
    out = np.full((2, 3, 65, 8), np.nan, dtype)
    result = check(q, k, v, out=out)
    assert result is out
    np.testing.assert_array_equal(out, sdpa.scaled_dot_product_attention(q, k, v))


def test_out_with_mixed_inputs_uses_the_promoted_dtype(isa, rng):
    q = rng.standard_normal((5, 16)).astype(np.float16)
    k = rng.standard_normal((9, 16)).astype(np.float32)
    v = rng.standard_normal((9, 4)).astype(np.float16)
    out = np.empty((5, 4), np.float32)
    assert sdpa.scaled_dot_product_attention(q, k, v, out=out) is out
    np.testing.assert_allclose(out, reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_out_fully_masked_rows_overwrite_garbage(isa, rng):
    q = rng.standard_normal((40, 16))
    k = rng.standard_normal((90, 16))
    v = rng.standard_normal((90, 8))
    mask = np.ones((40, 90), bool)
    mask[3] = False
    out = np.full((40, 8), np.nan)
    sdpa.scaled_dot_product_attention(q, k, v, mask, out=out)
    assert np.all(out[3] == 0.0) and not np.isnan(out).any()


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_out_of_another_dtype_is_rejected(rng, out_dtype):
    q = rng.standard_normal((5, 16))
    with pytest.raises(ValueError, match="out"):
        sdpa.scaled_dot_product_attention(q, q, q, out=np.empty((5, 16), out_dtype))


@pytest.mark.parametrize(
    "shape", [(5, 15), (4, 16), (1, 5, 16), (16, 5), (80,)], ids=lambda s: "x".join(map(str, s))
)
def test_out_of_another_shape_is_rejected(rng, shape):
    q = rng.standard_normal((5, 16))
    with pytest.raises(ValueError, match="out"):
        sdpa.scaled_dot_product_attention(q, q, q, out=np.empty(shape))


def test_read_only_out_is_rejected(rng):
    q = rng.standard_normal((5, 16))
    out = np.empty((5, 16))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        sdpa.scaled_dot_product_attention(q, q, q, out=out)


def test_out_that_is_not_an_array_is_rejected(rng):
    q = rng.standard_normal((5, 16))
    with pytest.raises(TypeError, match="out"):
        sdpa.scaled_dot_product_attention(q, q, q, out=[[0.0] * 16] * 5)


@pytest.mark.parametrize("target", ["query", "value"])
def test_out_overlapping_an_input(isa, rng, target):
    q = rng.standard_normal((2, 70, 16), dtype=np.float32)
    k = rng.standard_normal((2, 70, 16), dtype=np.float32)
    v = rng.standard_normal((2, 70, 16), dtype=np.float32)
    expected = sdpa.scaled_dot_product_attention(q, k, v)
    out = q if target == "query" else v
    assert sdpa.scaled_dot_product_attention(q, k, v, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_array_like_inputs(isa):
    q = [[1.0, 0.0], [0.0, 1.0]]
    out = sdpa.scaled_dot_product_attention(q, q, [[1.0, 2.0], [3.0, 4.0]], [[True, False]] * 2)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[1.0, 2.0], [1.0, 2.0]], rtol=1e-15)


@pytest.mark.parametrize(
    "scale",
    [1, np.float32(0.5), np.float64(2.0), np.int64(1)],
    ids=["int", "np.float32", "np.float64", "np.int64"],
)
def test_scale_types(isa, rng, scale):
    q = rng.standard_normal((5, 16))
    check(q, q, q, scale=scale)
