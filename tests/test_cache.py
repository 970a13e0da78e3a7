"""sdpa.KVCache: decode and chunked prefill over preallocated, ragged, rolling buffers."""

import numpy as np
import pytest
from conftest import assert_matches_reference, reference

import sdpa


def tokens(rng, batch, heads, T, dim=16):
    return rng.standard_normal((batch, heads, T, dim)).astype(np.float32)


def test_views_not_copies(rng):
    cache = sdpa.KVCache(2, 3, 10, 16)
    k, v = tokens(rng, 2, 3, 4), tokens(rng, 2, 3, 4)
    cache.append(k, v)
    assert cache.keys().shape == (2, 3, 4, 16) and np.shares_memory(cache.keys(), cache._k)
    np.testing.assert_array_equal(cache.values(), v)
    assert cache.lengths.tolist() == [4, 4] and cache.seen.tolist() == [4, 4]


def test_decode_steps_equal_full_causal_attention(rng):
    B, Hq, Hkv, T = 2, 4, 2, 20
    q, k, v = tokens(rng, B, Hq, T), tokens(rng, B, Hkv, T), tokens(rng, B, Hkv, T)
    full = reference(q, k, v, is_causal=True, enable_gqa=True)
    cache = sdpa.KVCache(B, Hkv, 32, 16)
    cache.append(k[:, :, :8], v[:, :, :8])
    chunk = cache.attend(q[:, :, :8], is_causal=True)  # chunked prefill
    steps = [chunk]
    for t in range(8, T):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        steps.append(cache.attend(q[:, :, t : t + 1]))
    assert_matches_reference(np.concatenate(steps, axis=2), full, np.float32)


def test_ragged_batches_follow_each_sequence_length(rng):
    B, H, T = 3, 2, 6
    cache = sdpa.KVCache(B, H, 20, 16)
    k, v = tokens(rng, B, H, T), tokens(rng, B, H, T)
    lens = np.array([6, 2, 4])
    cache.append(k, v, lengths=lens)
    q = tokens(rng, B, H, 3)
    out = cache.attend(q, q_lengths=np.array([3, 1, 2]), is_causal=True, window=(2, 0))
    for b, (n, m) in enumerate(zip([3, 1, 2], lens)):  # each sequence alone, bottom-right aligned
        want = reference(q[b, :, :n], k[b, :, :m], v[b, :, :m], is_causal=True, window=(2, 0),
                         alignment="bottom_right")  # fmt: skip
        assert_matches_reference(out[b, :, :n], want, np.float32)
        assert np.all(out[b, :, n:] == 0)


def test_a_rolling_cache_keeps_sliding_window_decoding_exact(rng):
    B, H, T, W = 2, 2, 40, 6
    q, k, v = tokens(rng, B, H, T), tokens(rng, B, H, T), tokens(rng, B, H, T)
    full = reference(q, k, v, is_causal=True, window=(W - 1, 0))
    cache = sdpa.KVCache(B, H, 9, 16, window=W)  # holds W - 1 + 4 tokens: compacts often
    outs = []
    for t in range(0, T, 2):  # chunks of two
        cache.append(k[:, :, t : t + 2], v[:, :, t : t + 2])
        outs.append(cache.attend(q[:, :, t : t + 2], is_causal=True))
        assert np.all(cache.lengths <= 9)
    assert cache.seen.tolist() == [T, T]
    assert_matches_reference(np.concatenate(outs, axis=2), full, np.float32)


def test_overflow_and_bad_calls(rng):
    cache = sdpa.KVCache(1, 2, 4, 16)
    cache.append(tokens(rng, 1, 2, 3), tokens(rng, 1, 2, 3))
    with pytest.raises(ValueError, match="exceed the capacity"):
        cache.append(tokens(rng, 1, 2, 2), tokens(rng, 1, 2, 2))
    assert cache.lengths.tolist() == [3]  # nothing was written
    with pytest.raises(ValueError, match=r"key must be \(batch, num_kv_heads, T, head_dim\)"):
        cache.append(tokens(rng, 1, 3, 1), tokens(rng, 1, 3, 1))
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.append(tokens(rng, 1, 2, 1), tokens(rng, 1, 2, 1), lengths=np.array([2]))
    with pytest.raises(TypeError, match="sets kv_lengths itself"):
        cache.attend(tokens(rng, 1, 2, 1), kv_lengths=1)
    with pytest.raises(ValueError, match="q_lengths must be 1 ints, one per sequence"):
        cache.attend(tokens(rng, 1, 2, 1), q_lengths=2)
    rolling = sdpa.KVCache(1, 2, 8, 16, window=4)
    with pytest.raises(ValueError, match="would miss dropped ones"):
        rolling.attend(tokens(rng, 1, 2, 1), window=(10, 0))
    rolling.append(tokens(rng, 1, 2, 8), tokens(rng, 1, 2, 8))  # fits while empty
    with pytest.raises(ValueError, match="use chunks of at most 5"):
        rolling.append(tokens(rng, 1, 2, 6), tokens(rng, 1, 2, 6))
    with pytest.raises(ValueError, match="capacity .* must be at least window"):
        sdpa.KVCache(1, 2, 3, 16, window=4)


def test_bfloat16_cache_with_a_float32_query(rng):
    import ml_dtypes

    cache = sdpa.KVCache(2, 2, 8, 16, dtype=ml_dtypes.bfloat16)
    k, v = tokens(rng, 2, 2, 5), tokens(rng, 2, 2, 5)
    cache.append(k, v)
    q = tokens(rng, 2, 4, 1)
    out = cache.attend(q)
    kb, vb = (a.astype(ml_dtypes.bfloat16) for a in (k, v))
    assert out.dtype == np.float32
    assert_matches_reference(out, reference(q, kb, vb, enable_gqa=True), np.float32)


def test_int8_cache_decodes_as_attention_over_its_dequantized_rows(rng):
    B, Hq, Hkv, T = 2, 4, 2, 12
    q, k, v = tokens(rng, B, Hq, T), tokens(rng, B, Hkv, T), tokens(rng, B, Hkv, T)
    cache = sdpa.KVCache(B, Hkv, 16, 16, dtype="int8", block=8)
    assert cache.dtype == np.int8
    cache.append(k[:, :, :6], v[:, :, :6], lengths=np.array([6, 4]))
    cache.append(k[:, :, 6:7], v[:, :, 6:7])  # ragged: sequence 1 writes at row 4
    keys, values = cache.keys(), cache.values()
    assert isinstance(keys, sdpa.QuantizedKV) and keys.block == 8 and keys.shape == (B, Hkv, 7, 16)
    assert np.shares_memory(keys.values, cache._k.values)
    assert np.shares_memory(values.scales, cache._v.scales)
    # each row is quantized on its own as it arrives: sequence 1's rows 0-3 then its row 6
    rows = np.concatenate([k[1:, :, :4], k[1:, :, 6:7]], axis=2)
    want = sdpa.quantize_kv(rows, block=8)
    np.testing.assert_array_equal(keys.values[1:, :, :5], want.values)
    np.testing.assert_array_equal(keys.scales[1:, :, :5], want.scales)
    out = cache.attend(q[:, :, :1])
    K, V = keys.dequantize(), values.dequantize()
    full = reference(q[:, :, :1], K, V, kv_lengths=cache.lengths[:, None],
                     alignment="bottom_right", enable_gqa=True)  # fmt: skip
    assert out.dtype == np.float32
    assert_matches_reference(out, full, np.float32)


def test_a_rolling_int8_cache_moves_values_and_scales_together(rng):
    B, H, T, W = 1, 2, 30, 5
    q, k, v = tokens(rng, B, H, T), tokens(rng, B, H, T), tokens(rng, B, H, T)
    k[..., :8] *= 100  # blocks of very different scales, so a lost scale would show
    K, V = (sdpa.quantize_kv(a, block=8).dequantize() for a in (k, v))
    full = reference(q, K, V, is_causal=True, window=(W - 1, 0))
    cache = sdpa.KVCache(B, H, 7, 16, dtype="int8", window=W, block=8)
    outs = []
    for t in range(T):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        outs.append(cache.attend(q[:, :, t : t + 1]))
    assert cache.lengths.tolist() == [6]  # compacted to the last W - 1 rows at least once
    assert_matches_reference(np.concatenate(outs, axis=2), full, np.float32)


def test_int8_cache_in_the_layer_and_bad_blocks(rng):
    layer = sdpa.MultiheadAttention(32, 4, num_kv_heads=2, rng=rng)
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    float_cache = sdpa.KVCache(1, 2, 8, 8)
    int8_cache = sdpa.KVCache(1, 2, 8, 8, dtype="int8")
    want = layer(x, is_causal=True, cache=float_cache)
    got = layer(x, is_causal=True, cache=int8_cache)
    assert got.shape == want.shape and got.dtype == np.float32
    # q8_0 keeps each element within half a step (max|block| / 254) of itself: a small error
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(ValueError, match="block must be a positive int"):
        sdpa.KVCache(1, 2, 8, 8, dtype="int8", block=0)
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64 or int8"):
        sdpa.KVCache(1, 2, 8, 8, dtype=np.int16)
