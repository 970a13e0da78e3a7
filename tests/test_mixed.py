"""Mixed storage (a query over key/value of a narrower type, each read in its own type) and the
8-bit key/value format (QuantizedKV, llama.cpp's q8_0), on every path and ISA."""

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_matches_reference, reference

import sdpa
from sdpa.api import _inner_path

bf16 = np.dtype(ml_dtypes.bfloat16)
f16, f32, f64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
attention = sdpa.scaled_dot_product_attention

# (L, S, extra options) that send a call to each inner path; E = 64, one kv head of 4 query heads
PATHS = {
    "panels": (70, 300, {}),
    "few_rows": (2, 1500, {}),
    "general": (70, 300, {"softcap": 7.0}),
}


def kv_of(x, kind):
    """x (float64) stored as `kind`: a dtype, or "q8" for QuantizedKV; and its float64 value."""
    if kind == "q8":
        q = sdpa.quantize_kv(x)
        return q, q.dequantize(np.float64)
    stored = x.astype(kind)
    return stored, stored.astype(np.float64)


def problem(rng, L, S, qdtype, kind, E=64, Ev=48, heads=(2, 4), kv_heads=1):
    q = rng.standard_normal((*heads, L, E)).astype(qdtype)
    k, kd = kv_of(rng.standard_normal((heads[0], kv_heads, S, E)), kind)
    v, vd = kv_of(rng.standard_normal((heads[0], kv_heads, S, Ev)), kind)
    return q, k, v, kd, vd


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("kind", [f16, bf16, "q8"], ids=["float16", "bfloat16", "q8"])
@pytest.mark.parametrize("qdtype", [f32, bf16, f16, f64], ids=lambda d: np.dtype(d).name)
def test_mixed_storage_result_is_the_querys(isa, rng, path, kind, qdtype):
    L, S, opts = PATHS[path]
    q, k, v, kd, vd = problem(rng, L, S, qdtype, kind)
    if qdtype != f64:  # (float64 always takes the general path)
        assert _inner_path(q, k, v, enable_gqa=True, **opts) == path
    out = attention(q, k, v, enable_gqa=True, **opts)
    assert out.dtype == qdtype  # the query's dtype: K/V storage never widens it
    expected = reference(q, kd, vd, enable_gqa=True, **opts)
    assert_matches_reference(out, expected, qdtype)


@pytest.mark.parametrize("kind", [f16, bf16, "q8"], ids=["float16", "bfloat16", "q8"])
@pytest.mark.parametrize(
    "options",
    [{"is_causal": True}, {"window": (30, 2)}, {"kv_lengths": np.array([[250], [77]])}],
    ids=["causal", "window", "kv_lengths"],
)
def test_mixed_storage_with_key_ranges(isa, rng, kind, options):
    q, k, v, kd, vd = problem(rng, 70, 300, f32, kind)
    out = attention(q, k, v, enable_gqa=True, alignment="bottom_right", **options)
    expected = reference(q, kd, vd, enable_gqa=True, alignment="bottom_right", **options)
    assert_matches_reference(out, expected, f32)


def test_float16_query_over_bfloat16_cache(isa, rng):
    q, k, v, kd, vd = problem(rng, 1, 2000, f16, bf16)
    out = attention(q, k, v, enable_gqa=True)
    assert out.dtype == f16
    assert_matches_reference(out, reference(q, kd, vd, enable_gqa=True), f16)


def test_strided_and_transposed_quantized_kv(isa, rng):
    # a (B, S, H, D) cache seen as (B, H, S, D): rows H * D apart, heads D apart
    x = rng.standard_normal((2, 500, 4, 64))
    qkv = sdpa.quantize_kv(x)
    k = sdpa.QuantizedKV(qkv.values.transpose(0, 2, 1, 3), qkv.scales.transpose(0, 2, 1, 3), 32)
    kd = k.dequantize(np.float64)
    q = rng.standard_normal((2, 4, 3, 64)).astype(np.float32)
    assert_matches_reference(attention(q, k, k), reference(q, kd, kd), f32)
    # a decode step, 4 query heads a kv head: the loop that scores two keys at a time
    q = rng.standard_normal((2, 16, 1, 64)).astype(np.float32)
    out = attention(q, k, k, enable_gqa=True)
    assert_matches_reference(out, reference(q, kd, kd, enable_gqa=True), f32)


@pytest.mark.parametrize("block", [16, 32, 48, 7], ids=str)
@pytest.mark.parametrize("E", [64, 59, 40], ids=str)
def test_quantized_kv_block_sizes(isa, rng, block, E):
    # short last blocks (59 = 32 + 27) and blocks that are not whole packets (7) included
    q = rng.standard_normal((3, 5, E)).astype(np.float32)
    for L in (5, 60):
        q = rng.standard_normal((3, L, E)).astype(np.float32)
        k = sdpa.quantize_kv(rng.standard_normal((3, 900, E)), block=block)
        v = sdpa.quantize_kv(rng.standard_normal((3, 900, E)), block=block)
        out = attention(q, k, v)
        expected = reference(q, k.dequantize(np.float64), v.dequantize(np.float64))
        assert_matches_reference(out, expected, f32)


@pytest.mark.parametrize("group", [4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize(
    "block,E",
    [(16, 64), (32, 128), (48, 96), (64, 128), (128, 256), (256, 256), (512, 512), (32, 80)],
    ids=str,
)
def test_quantized_decode_scale_blocks(isa, rng, group, block, E):
    # decode over a q8 cache, 4 and 8 query heads a kv head: on AVX-512, the loop that scores 16
    # keys at a time, lanes along the keys, applying each scale block's scale to a block's sums
    # (E a multiple of 32, blocks of 16 or more; E = 80 takes the other loop), in integers with
    # VNNI up to blocks of 256 (512 takes the float loop); 1000 keys leave keys for the two-key
    # loop. Blocks of very different magnitudes expose a scale misapplied.
    def cache():
        x = rng.standard_normal((2, 2, 1000, E))
        mag = np.exp(rng.uniform(-3, 3, (2, 2, 1000, -(-E // block))))
        return sdpa.quantize_kv(x * np.repeat(mag, block, axis=-1)[..., :E], block=block)

    k, v = cache(), cache()
    q = rng.standard_normal((2, 2 * group, 1, E)).astype(np.float32) / 4
    out = attention(q, k, v, enable_gqa=True)
    kd, vd = k.dequantize(np.float64), v.dequantize(np.float64)
    assert_matches_reference(out, reference(q, kd, vd, enable_gqa=True), f32)


@pytest.mark.parametrize("block", [32, 256], ids=str)
def test_quantized_decode_query_extremes(isa, rng, block):
    # decode over a q8 cache with the query rows that the VNNI score loop (CPUs with AVX512-VNNI)
    # writes as three bytes against a scale per row: magnitudes over 7 decades in one row, a
    # zero row, rows of +-1 (every byte at its extreme) against keys of 127 and -128 over whole
    # blocks of 256 (the integer sums at their largest); and, each in a kv head of its own, a
    # row too small for a float scale and a row with a NaN (the float loop takes those).
    E, S = 256, 600
    vals = rng.integers(-128, 128, (1, 5, S, E), dtype=np.int8)
    vals[:, :, :50] = 127
    vals[:, :, 50:100] = -128
    scales = rng.uniform(0.002, 0.02, (1, 5, S, E // block)).astype(np.float16)
    k = sdpa.QuantizedKV(vals, scales, block)
    v = sdpa.quantize_kv(rng.standard_normal((1, 5, S, E)), block=block)
    q = rng.standard_normal((1, 20, 1, E)).astype(np.float32)
    q[0, 1, 0] *= np.exp(rng.uniform(-8, 8, E)).astype(np.float32)
    q[0, 2] = 0
    q[0, 4] = 1
    q[0, 5] = -1
    q[0, 6, 0, ::2] = -1
    q[0, 8] *= np.float32(1e-30)
    q[0, 12, 0, 7] = np.nan
    out = attention(q, k, v, enable_gqa=True)
    expected = reference(q, k.dequantize(np.float64), v.dequantize(np.float64), enable_gqa=True)
    assert np.isnan(out[0, 12]).all()  # the NaN stays in its row
    keep = np.arange(20) != 12
    assert_matches_reference(out[:, keep], expected[:, keep], f32)


@pytest.mark.parametrize("Hkv,S,E", [(64, 4500, 32), (2, 9000, 128)], ids=str)
def test_quantized_decode_long_cache(isa, rng, Hkv, S, E):
    # few-row tiles over a q8 cache take key blocks of up to 2048 keys within their splits: 64
    # tiles of 4500 keys (no split; blocks of 2048, 2048 and 404), and 2 tiles of 9000 keys
    # (split 7 ways into 1536 keys, one block each, the last shorter)
    k = sdpa.quantize_kv(rng.standard_normal((1, Hkv, S, E)))
    v = sdpa.quantize_kv(rng.standard_normal((1, Hkv, S, E)))
    q = rng.standard_normal((1, 4 * Hkv, 1, E)).astype(np.float32)
    q[..., : E // 2] *= 3  # (a few keys then stand out, so each block's max and rescale matter)
    out = attention(q, k, v, enable_gqa=True)
    # (the reference with each kv head's 4 query heads as 4 query rows: the same sums)
    kd, vd = k.dequantize(np.float64), v.dequantize(np.float64)
    expected = reference(q.reshape(1, Hkv, 4, E), kd, vd).reshape(out.shape)
    assert_matches_reference(out, expected, f32)


def roundf(t):
    """C's roundf on float64 values: halves away from zero."""
    return np.sign(t) * np.floor(np.abs(t) + 0.5)


def test_quantizer_is_llama_cpp_q8_0_reference():
    # llama.cpp quantize_row_q8_0_ref: d = amax / 127 (float32), q = roundf(x * (1 / d)),
    # stored scale float16(d); a zero block has scale 0 and zeros
    x = np.zeros((2, 64), np.float32)
    x[0, :5] = [127, 0.5, -0.5, 1.5, 2.5]  # d = 1: ties go away from zero, not to even
    x[0, 32:] = np.linspace(-3.3, 7.1, 32, dtype=np.float32)
    q = sdpa.quantize_kv(x)
    assert q.values.dtype == np.int8 and q.scales.dtype == np.float16
    assert q.values.shape == (2, 64) and q.scales.shape == (2, 2)
    np.testing.assert_array_equal(q.values[0, :5], [127, 1, -1, 2, 3])
    d = np.float32(np.float32(7.1) / np.float32(127))
    want = roundf(x[0, 32:] * (np.float32(1) / d)).astype(np.int8)
    np.testing.assert_array_equal(q.values[0, 32:], want)
    assert q.scales[0, 1] == np.float16(d)
    assert np.all(q.values[1] == 0) and np.all(q.scales[1] == 0)
    assert np.all(np.abs(q.values.astype(int)) <= 127)
    np.testing.assert_array_equal(q.dequantize()[1], 0.0)


def test_quantizer_round_trip_error_is_half_a_step(rng):
    x = rng.standard_normal((50, 128)) * rng.uniform(0.01, 100, (50, 1))
    q = sdpa.quantize_kv(x)
    step = np.repeat(q.scales.astype(np.float64), 32, axis=-1)
    err = np.abs(q.dequantize(np.float64) - x)
    # half a step, plus the float16 rounding of the scale (2^-11 of each value)
    assert np.all(err <= 0.5 * step + np.abs(x) * 2.0**-11 + 1e-12)


def test_values_beyond_the_float16_scales_are_refused(rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[2, 40] = 9e6  # its block's scale, 9e6 / 127, is past float16's 65504
    with pytest.raises(ValueError, match=r"beyond \+-8.319e\+06.*max \|x\| = 9e\+06"):
        sdpa.quantize_kv(x)
    x[2, 40] = 8e6  # within range: scale 63000 is a float16
    assert np.all(np.isfinite(sdpa.quantize_kv(x).dequantize()))


def test_non_finite_block_dequantizes_to_nan_and_reaches_only_its_attenders(isa, rng):
    x = rng.standard_normal((1, 200, 64))
    x[0, 150, 40] = np.inf
    k = sdpa.quantize_kv(x)
    assert np.isnan(k.scales[0, 150, 1]) and np.isfinite(k.scales[0, 150, 0])
    assert np.all(np.isnan(k.dequantize()[0, 150, 32:]))
    q = rng.standard_normal((1, 200, 64)).astype(np.float32)
    out = attention(q, k, k, is_causal=True)
    # rows 150.. attend key 150 (causal): NaN there, finite above
    assert np.all(np.isfinite(out[0, :150])) and np.all(np.isnan(out[0, 150:]))


def test_quantized_kv_as_a_cache(isa, rng):
    cache_k = sdpa.QuantizedKV.empty((2, 4, 1000, 64))
    cache_v = sdpa.QuantizedKV.empty((2, 4, 1000, 64))
    assert cache_k.values.shape == (2, 4, 1000, 64) and cache_k.scales.shape == (2, 4, 1000, 2)
    np.testing.assert_array_equal(cache_k.dequantize(), 0.0)
    k = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
    v = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
    for a, b in ((0, 100), (100, 101), (101, 300)):  # a prefill, then steps written in place
        cache_k.write((slice(None), slice(None), slice(a, b)), k[:, :, a:b])
        cache_v.write((slice(None), slice(None), slice(a, b)), v[:, :, a:b])
    np.testing.assert_array_equal(cache_k[:, :, :300].values, sdpa.quantize_kv(k).values)
    view_k, view_v = cache_k[:, :, :300], cache_v[:, :, :300, :]
    assert np.shares_memory(view_k.values, cache_k.values)
    assert np.shares_memory(view_v.scales, cache_v.scales)
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    out = attention(q, view_k, view_v)
    expected = reference(q, view_k.dequantize(np.float64), view_v.dequantize(np.float64))
    assert_matches_reference(out, expected, f32)
    with pytest.raises(IndexError):
        cache_k[..., :32]  # the last dim stays whole


def test_varlen_with_quantized_kv(isa, rng):
    lens_q, lens_k = [3, 1, 40], [50, 700, 40]
    cu_q, cu_k = np.cumsum([0, *lens_q]), np.cumsum([0, *lens_k])
    q = rng.standard_normal((cu_q[-1], 4, 64)).astype(np.float32)
    k = sdpa.quantize_kv(rng.standard_normal((cu_k[-1], 2, 64)))
    v = sdpa.quantize_kv(rng.standard_normal((cu_k[-1], 2, 64)))
    out = sdpa.varlen_attention(q, k, v, cu_q, cu_k, is_causal=True)
    kd, vd = k.dequantize(np.float64), v.dequantize(np.float64)
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        expected = reference(
            q[rows].swapaxes(0, 1), kd[keys].swapaxes(0, 1), vd[keys].swapaxes(0, 1),
            is_causal=True, alignment="bottom_right", enable_gqa=True,
        ).swapaxes(0, 1)  # fmt: skip
        assert_matches_reference(out[rows], expected, f32)


def test_attention_weights_over_a_quantized_key(isa, rng):
    q = rng.standard_normal((2, 20, 64)).astype(np.float32)
    k = sdpa.quantize_kv(rng.standard_normal((2, 90, 64)))
    w = sdpa.attention_weights(q, k)
    expected = sdpa.reference.attention_weights(q.astype(np.float64), k.dequantize(np.float64))
    assert_matches_reference(w, expected, f32)


def test_quantized_key_with_float_value_is_a_type_error(rng):
    k = sdpa.quantize_kv(rng.standard_normal((9, 32)))
    q = np.ones((2, 32), np.float32)
    with pytest.raises(TypeError, match="QuantizedKV"):
        attention(q, k, np.ones((9, 32), np.float32))
    with pytest.raises(TypeError, match="query"):
        attention(k, k, k)


def test_float32_query_over_bfloat16_cache_copies_nothing(rng):
    # a 64 MB bfloat16 cache under a float32 query: no allocation proportional to the cache (a
    # cast copy would be 128 MB of float32)
    k = rng.standard_normal((1, 8, 32768, 128), dtype=np.float32).astype(bf16)
    v = k[:, :, ::-1]
    q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
    attention(q, k, v, enable_gqa=True)  # (the pool and its scratch exist before measuring)
    tracemalloc.start()
    try:
        out = attention(q, k, v, enable_gqa=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MB allocated during the call"
