"""Plain attention (no mask) against the reference: shapes at block edges, batch dims, scale."""

import numpy as np
import pytest
from conftest import check, reference

import sdpa
from sdpa import _core

# (L, S, E, Ev): every L and S in 1, 3, 17, 63, 64, 65, 127, 129, 1000 appears, next to the key
# block edges (255, 256, 257, 513) and E != Ev; not the full cross product.
SHAPES = [
    (1, 1, 1, 1),
    (1, 1000, 64, 64),
    (3, 17, 8, 5),
    (17, 3, 5, 8),
    (63, 64, 16, 16),
    (64, 63, 32, 7),
    (64, 64, 64, 64),
    (65, 65, 17, 33),
    (127, 129, 24, 24),
    (129, 127, 3, 40),
    (1000, 1, 7, 9),
    (1000, 65, 16, 12),
    (17, 1000, 128, 64),
    (65, 255, 32, 32),
    (63, 256, 16, 20),
    (129, 257, 20, 16),
    (3, 513, 40, 8),
    (1000, 1000, 32, 32),
]


def shape_id(shape):
    return "L{}-S{}-E{}-Ev{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_shapes_float32(isa, rng, shape):
    L, S, E, Ev = shape
    q = rng.standard_normal((2, L, E), dtype=np.float32)
    k = rng.standard_normal((2, S, E), dtype=np.float32)
    v = rng.standard_normal((2, S, Ev), dtype=np.float32)
    check(q, k, v)


@pytest.mark.parametrize("shape", SHAPES[::3], ids=shape_id)
def test_shapes_float64(isa, rng, shape):
    L, S, E, Ev = shape
    q = rng.standard_normal((L, E))
    k = rng.standard_normal((S, E))
    v = rng.standard_normal((S, Ev))
    check(q, k, v)


@pytest.mark.parametrize(
    "q_batch,kv_batch",
    [
        ((), ()),
        ((4,), (4,)),
        ((2, 3), (2, 3)),
        ((2, 3, 2), (2, 3, 2)),
        ((2, 1, 3), (1, 4, 3)),
        ((2, 3), (3,)),
        ((3,), (2, 3)),
        ((2, 3), (1, 1)),
        ((1,), (5,)),
        ((2, 1), (1, 3)),
        ((2, 1, 2, 1, 2), (1, 2, 1, 2, 1)),
    ],
    ids=lambda b: "x".join(map(str, b)) or "none",
)
def test_batch_dims_and_broadcasting(isa, rng, q_batch, kv_batch):
    q = rng.standard_normal((*q_batch, 19, 8), dtype=np.float32)
    k = rng.standard_normal((*kv_batch, 70, 8), dtype=np.float32)
    v = rng.standard_normal((*kv_batch, 70, 6), dtype=np.float32)
    out = check(q, k, v)
    assert out.shape == np.broadcast_shapes(q_batch, kv_batch) + (19, 6)


def test_key_and_value_batch_dims_broadcast_separately(isa, rng):
    q = rng.standard_normal((2, 3, 9, 4), dtype=np.float32)
    k = rng.standard_normal((3, 11, 4), dtype=np.float32)
    v = rng.standard_normal((2, 1, 11, 5), dtype=np.float32)
    assert check(q, k, v).shape == (2, 3, 9, 5)


@pytest.mark.parametrize("scale", [0.5, 2.0, 1e-3, 10.0, -0.7], ids=lambda s: f"scale{s}")
def test_custom_scale(isa, rng, scale):
    q = rng.standard_normal((2, 33, 16), dtype=np.float32)
    k = rng.standard_normal((2, 70, 16), dtype=np.float32)
    v = rng.standard_normal((2, 70, 16), dtype=np.float32)
    out = check(q, k, v, scale=scale)
    default = sdpa.scaled_dot_product_attention(q, k, v)
    assert not np.allclose(out, default)


def test_scale_zero_gives_uniform_weights(isa, rng):
    q = rng.standard_normal((5, 8))
    k = rng.standard_normal((300, 8))
    v = rng.standard_normal((300, 3))
    out = check(q, k, v, scale=0.0)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=0), out.shape), atol=1e-12)


def test_default_scale_is_inverse_sqrt_e(isa, rng):
    q = rng.standard_normal((3, 20, 25))
    k = rng.standard_normal((3, 40, 25))
    v = rng.standard_normal((3, 40, 4))
    np.testing.assert_allclose(
        sdpa.scaled_dot_product_attention(q, k, v),
        sdpa.scaled_dot_product_attention(q, k, v, scale=0.2),
        rtol=1e-13,
        atol=1e-15,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_large_scores_do_not_overflow(isa, rng, dtype):
    # scores up to ~3e4 overflow exp() unless the running max is subtracted; integer-valued
    # inputs keep q.k exact in float32, so the problem stays well conditioned
    q = (200 * rng.integers(-3, 4, (2, 70, 16))).astype(dtype)
    k = rng.integers(-3, 4, (2, 300, 16)).astype(dtype)
    v = rng.standard_normal((2, 300, 8)).astype(dtype)
    out = check(q, k, v, scale=1.0)
    assert np.all(np.isfinite(out))


def test_value_rows_are_reproduced_by_one_hot_attention(isa):
    # each query matches exactly one key with a huge score: the output is that key's value row
    S = 300
    k = np.eye(S, dtype=np.float32)
    v = np.arange(S * 2, dtype=np.float32).reshape(S, 2)
    rows = np.array([0, 7, 255, 256, 299])
    q = 1000.0 * np.eye(S, dtype=np.float32)[rows]
    out = sdpa.scaled_dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out, v[rows], rtol=1e-6, atol=1e-6)


def test_returns_new_array_and_leaves_inputs_untouched(isa, rng):
    q = rng.standard_normal((2, 5, 4), dtype=np.float32)
    k = rng.standard_normal((2, 6, 4), dtype=np.float32)
    v = rng.standard_normal((2, 6, 3), dtype=np.float32)
    copies = [x.copy() for x in (q, k, v)]
    out = sdpa.scaled_dot_product_attention(q, k, v)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)
    assert isinstance(out, np.ndarray) and out.flags.writeable
    assert not any(np.shares_memory(out, x) for x in (q, k, v))


# The direct binding route (plain calls) and the general Python route must agree bit for bit.
def _both_routes(q, k, v, **kwargs):
    fast = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    general, _ = sdpa.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    return fast, general


@pytest.mark.parametrize(
    "layout", ["contiguous", "transposed", "reversed", "fortran", "big-endian", "subclass", "3d"]
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_fast_and_general_routes_agree(isa, rng, layout, dtype):
    x = rng.standard_normal((2, 70, 3 * 16)).astype(dtype)
    q = x.reshape(2, 70, 3, 16).transpose(0, 2, 1, 3)
    k, v = q.copy(), rng.standard_normal((2, 3, 70, 8)).astype(dtype)
    if layout == "contiguous":
        q = np.ascontiguousarray(q)
    elif layout == "reversed":
        q = q[:, :, ::-1]
    elif layout == "fortran":
        k = np.asfortranarray(k)
    elif layout == "big-endian":
        k = k.astype(k.dtype.newbyteorder(">"))
    elif layout == "subclass":
        q = np.ascontiguousarray(q).view(_Sub)
    elif layout == "3d":
        q, k, v = q[0], k[0], v[0]
    for kwargs in ({}, {"is_causal": True}, {"scale": 0.3}):
        fast, general = _both_routes(q, k, v, **kwargs)
        assert type(fast) is np.ndarray and fast.dtype == general.dtype
        np.testing.assert_array_equal(fast, general)


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize(
    "qdtype, kv",
    [
        (q, kv)
        for kv in ("float16", "bfloat16")
        for q in ("float32", "float16", "bfloat16", "float64")
        if q != kv
    ],
)
def test_fast_and_general_routes_agree_on_mixed_storage(isa, rng, qdtype, kv):
    # A query over a float16 or bfloat16 cache takes the direct route (the result in the
    # query's dtype); a big-endian cache falls to the general route, with the same answer.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    qd, kvd = (np.dtype(getattr(ml_dtypes, n, None) or n) for n in (qdtype, kv))
    q = rng.standard_normal((2, 8, 1, 32)).astype(qd)  # a decode step, 4 query heads a kv head
    k = rng.standard_normal((2, 2, 300, 32)).astype(kvd)
    v = rng.standard_normal((2, 2, 300, 24)).astype(kvd)
    assert _core.attention_direct(q, k, v, {"enable_gqa": True}) is not None
    for kwargs in ({}, {"is_causal": True}, {"scale": 0.3}):
        fast, general = _both_routes(q, k, v, enable_gqa=True, **kwargs)
        assert fast.dtype == general.dtype == qd
        np.testing.assert_array_equal(fast, general)
    ks, vs = (x.astype(x.dtype.newbyteorder(">")) for x in (k, v))
    assert _core.attention_direct(q, ks, vs, {"enable_gqa": True}) is None
    fast = sdpa.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)
    np.testing.assert_array_equal(fast, _both_routes(q, k, v, enable_gqa=True)[1])


@pytest.mark.parametrize("qdtype", ["float32", "float16", "bfloat16"])
def test_fast_and_general_routes_agree_on_quantized_kv(isa, rng, qdtype):
    # A query over QuantizedKV key and value takes the direct route too; strided scales and a
    # transposed cache as well. Scales that are not plain float16 arrays of the right shape, or
    # blocks that differ, fall to the Python layer, which converts or raises.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    qd = np.dtype(getattr(ml_dtypes, qdtype, None) or qdtype)
    q = rng.standard_normal((2, 8, 1, 64)).astype(qd)  # a decode step, 4 query heads a kv head
    k = sdpa.quantize_kv(rng.standard_normal((2, 2, 300, 64)))
    v = sdpa.quantize_kv(rng.standard_normal((2, 2, 300, 48)))
    x = sdpa.quantize_kv(rng.standard_normal((2, 300, 2, 64)))  # (B, S, H, D) seen as (B, H, S, D)
    kt = sdpa.QuantizedKV(x.values.transpose(0, 2, 1, 3), x.scales.transpose(0, 2, 1, 3), 32)
    for kk in (k, kt):
        assert _core.attention_direct(q, kk, v, {"enable_gqa": True}) is not None
        for kwargs in ({}, {"is_causal": True}, {"scale": 0.3}):
            fast, general = _both_routes(q, kk, v, enable_gqa=True, **kwargs)
            assert fast.dtype == general.dtype == qd
            np.testing.assert_array_equal(fast, general)
    raw = np.empty(k.scales.nbytes + 1, np.uint8)  # scales at an odd address: not aligned
    odd = np.frombuffer(raw.data, np.float16, k.scales.size, offset=1).reshape(k.scales.shape)
    odd[...] = k.scales
    unaligned = sdpa.QuantizedKV(k.values, odd, k.block)
    assert not unaligned.scales.flags.aligned
    assert _core.attention_direct(q, unaligned, v, {"enable_gqa": True}) is None
    np.testing.assert_array_equal(
        sdpa.scaled_dot_product_attention(q, unaligned, v, enable_gqa=True),
        _both_routes(q, k, v, enable_gqa=True)[1],
    )
    bad = sdpa.QuantizedKV(k.values, k.scales, k.block)
    bad.scales = k.scales[..., :1]  # (an attribute replaced after construction: wrong shape)
    assert _core.attention_direct(q, bad, v, {"enable_gqa": True}) is None
    with pytest.raises(ValueError, match=r"key \(QuantizedKV\): scales must have shape"):
        sdpa.scaled_dot_product_attention(q, bad, v, enable_gqa=True)
    other = sdpa.quantize_kv(v.dequantize(), block=16)
    assert _core.attention_direct(q, k, other, {"enable_gqa": True}) is None
    with pytest.raises(ValueError, match="share a block size"):
        sdpa.scaled_dot_product_attention(q, k, other, enable_gqa=True)
    assert _core.attention_direct(q, k, v.values, {"enable_gqa": True}) is None
    with pytest.raises(TypeError, match="value must have dtype.*got int8"):
        sdpa.scaled_dot_product_attention(q, k, v.values, enable_gqa=True)


def test_fast_route_with_out(rng):
    q = rng.standard_normal((2, 3, 40, 16)).astype(np.float32)
    out = np.full((2, 3, 40, 16), np.nan, np.float32)
    result = sdpa.scaled_dot_product_attention(q, q, q, out=out)
    assert result is out
    _, general = _both_routes(q, q, q)
    np.testing.assert_array_equal(out, general)
    # out overlapping an input: still the right answer (computed aside, then copied)
    q2 = q.copy()
    sdpa.scaled_dot_product_attention(q2, q2, q2, out=q2)
    np.testing.assert_array_equal(q2, general)


@pytest.mark.parametrize("S", [70, 3000], ids=["S70", "S3000-split"])
def test_nan_in_the_inputs_reaches_the_output(isa, rng, S):
    # A NaN must not vanish into a max or a "no key left" row: the reference gives NaN there.
    q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, S, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, S, 5)).astype(np.float32)
    q[0, 1, 2, 3] = np.nan
    out, lse = sdpa.scaled_dot_product_attention(q, k, v, return_lse=True)
    ref_out, ref_lse = sdpa.reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    assert np.isnan(out[0, 1, 2]).all() and np.isfinite(np.delete(out.reshape(-1, 5), 6, 0)).all()
    weights = sdpa.attention_weights(q, k)
    assert np.isnan(weights[0, 1, 2]).all()
    assert np.isfinite(weights[0, 1, [0, 1, 3]]).all()
    fast = sdpa.scaled_dot_product_attention(q, k, v)  # the direct route too
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref_out))


def test_an_output_that_cancels_is_judged_by_what_it_sums(isa, rng):
    # One value column over 1100 keys, shifted so that the weighted sum cancels to ~0: float32
    # accumulation can only be asked for an error small against sum_j p_j |v_j| (about 0.8 here),
    # not against the tiny output itself. Hypothesis found such a case (output 1.8e-4, error 6e-9).
    q = rng.standard_normal((1, 1, 2)).astype(np.float32)
    k = rng.standard_normal((1, 1100, 2)).astype(np.float32)
    v = rng.standard_normal((1, 1100, 1))
    w = sdpa.reference.attention_weights(q.astype(np.float64), k.astype(np.float64))
    v = (v - (w @ v)).astype(np.float32)  # the exact output is now ~0
    out = check(q, k, v)
    magnitude = reference(q, k, np.abs(v))
    assert np.abs(out).max() < 1e-3 * magnitude.max()
    assert np.abs(out - reference(q, k, v)).max() <= 1e-6 * magnitude.max()
