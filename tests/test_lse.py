"""return_lse: shape, dtype and values of the log-sum-exp, -inf for rows with no key, and the
property it exists for: attention over key chunks merges exactly into attention over all keys."""

import numpy as np
import pytest
from conftest import (
    assert_lse_matches,
    assert_matches_reference,
    check_lse,
    lse_dtype,
    reference,
    tolerance,
)

import sdpa

attention = sdpa.scaled_dot_product_attention
float_id = lambda d: np.dtype(d).name  # noqa: E731


def qkv(rng, q_shape, kv_shape, dtype=np.float32, ev=12):
    q = rng.standard_normal(q_shape).astype(dtype)
    k = rng.standard_normal(kv_shape).astype(dtype)
    v = rng.standard_normal((*kv_shape[:-1], ev)).astype(dtype)
    return q, k, v


# --- shape, dtype, values ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_lse_shape_and_dtype(isa, rng, dtype):
    q, k, v = qkv(rng, (2, 3, 70, 16), (2, 3, 300, 16), dtype)
    out, lse = check_lse(q, k, v)
    assert out.shape == (2, 3, 70, 12)
    assert lse.shape == (2, 3, 70)
    assert lse.dtype == lse_dtype(dtype)


@pytest.mark.parametrize(
    "dtypes,want",
    [
        ((np.float16, np.float32, np.float16), np.float32),
        ((np.float16, np.float64, np.float32), np.float64),
    ],
    ids=["f16+f32->f32", "f16+f64->f64"],
)
def test_lse_dtype_of_mixed_inputs(isa, rng, dtypes, want):
    q = rng.standard_normal((2, 5, 8)).astype(dtypes[0])
    k = rng.standard_normal((2, 9, 8)).astype(dtypes[1])
    v = rng.standard_normal((2, 9, 4)).astype(dtypes[2])
    out, lse = check_lse(q, k, v)
    assert out.dtype == want and lse.dtype == want


def test_without_return_lse_a_plain_array_comes_back(isa, rng):
    q, k, v = qkv(rng, (3, 10, 8), (3, 20, 8))
    result = attention(q, k, v, return_lse=False)
    assert isinstance(result, np.ndarray)
    assert isinstance(attention(q, k, v, is_causal=True, window=(3, None)), np.ndarray)


def test_lse_broadcast_batch(isa, rng):
    q, k, v = qkv(rng, (3, 17, 8), (2, 1, 40, 8))
    out, lse = check_lse(q, k, v)
    assert out.shape == (2, 3, 17, 12) and lse.shape == (2, 3, 17)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"is_causal": True},
        {"is_causal": True, "alignment": "bottom_right"},
        {"window": (20, 5)},
        {"window": (40, 0), "alignment": "bottom_right"},
        {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
        {"softcap": 2.0, "scale": 2.0},
        {"kv_lengths": np.array([[300], [129]])},
        {"enable_gqa": True},
        {"scale": -0.7},
    ],
    ids=[
        "causal",
        "causal-bottom-right",
        "window",
        "window-bottom-right",
        "alibi",
        "softcap",
        "kv-lengths",
        "gqa",
        "negative-scale",
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=float_id)
def test_lse_matches_reference(isa, rng, dtype, kwargs):
    kv_heads = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = qkv(rng, (2, 4, 70, 16), (2, kv_heads, 300, 16), dtype)
    check_lse(q, k, v, **kwargs)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_lse_with_masks(isa, rng, kind):
    q, k, v = qkv(rng, (2, 3, 70, 16), (2, 3, 300, 16))
    if kind == "bool":
        mask = rng.random((70, 300)) < 0.5
    else:
        mask = rng.standard_normal((3, 70, 300)).astype(np.float32)
        mask[rng.random(mask.shape) < 0.2] = -np.inf
    check_lse(q, k, v, mask, is_causal=True)


def test_lse_shifts_by_a_constant_float_mask(isa, rng):
    # log-sum-exp(s + c) = log-sum-exp(s) + c, and the output does not move
    q, k, v = qkv(rng, (3, 40, 16), (3, 300, 16), np.float64)
    out0, lse0 = attention(q, k, v, return_lse=True)
    out1, lse1 = attention(q, k, v, np.full((40, 300), 3.0), return_lse=True)
    np.testing.assert_allclose(lse1, lse0 + 3.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out1, out0, rtol=0, atol=1e-12)


def test_lse_of_a_single_key_is_its_score(isa, rng):
    q, k, v = qkv(rng, (4, 6, 8), (4, 1, 8), np.float64)
    out, lse = check_lse(q, k, v, scale=0.3)
    np.testing.assert_allclose(lse, 0.3 * (q @ k.swapaxes(-1, -2))[..., 0], rtol=1e-12)
    np.testing.assert_array_equal(out, np.broadcast_to(v, out.shape))


# --- rows with no key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L,S,kwargs",
    [
        (50, 20, {"is_causal": True, "alignment": "bottom_right"}),  # rows i < L - S
        (50, 20, {"window": (0, 0)}),  # rows i >= S
        (30, 300, {"kv_lengths": np.array([0, 7, 0])}),
        (30, 300, {"window": (None, 3), "kv_lengths": np.array([[0], [300]])}),
        (30, 0, {}),  # no keys at all
        # (top-left: with "bottom_right" the diagonal follows kv_lengths, FlashAttention's rule)
        (30, 300, {"window": (2, 2), "kv_lengths": 10}),  # rows i > 11
        (30, 300, {"alignment": "bottom_right", "q_lengths": 20, "kv_lengths": 100}),  # padding
    ],
    ids=[
        "causal-bottom-right-L>S",
        "window-0-0-L>S",
        "kv-lengths-0",
        "kv-lengths-0-window",
        "S=0",
        "window-beyond-kv-length",
        "q-lengths-padding",
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_rows_with_no_key_give_minus_inf(isa, rng, dtype, L, S, kwargs):
    q, k, v = qkv(rng, (2, 3, L, 16), (2, 3, S, 16), dtype)
    out, lse = check_lse(q, k, v, **kwargs)
    assert np.any(lse == -np.inf)


def test_fully_masked_rows_bool_and_float(isa, rng):
    q, k, v = qkv(rng, (2, 40, 16), (2, 300, 16))
    bool_mask = rng.random((40, 300)) < 0.5
    bool_mask[::3] = False
    float_mask = np.where(bool_mask, 0.0, -np.inf).astype(np.float32)
    for mask in (bool_mask, float_mask):
        out, lse = check_lse(q, k, v, mask, softcap=3.0)
        assert np.all(lse[:, ::3] == -np.inf) and np.all(np.isfinite(lse[:, 1::3]))
        assert np.all(out[:, ::3] == 0)


def test_lse_with_zero_query_rows(isa, rng):
    q, k, v = qkv(rng, (2, 3, 0, 8), (2, 3, 50, 8))
    out, lse = check_lse(q, k, v)
    assert out.shape == (2, 3, 0, 12) and lse.shape == (2, 3, 0)


def test_lse_with_out(isa, rng):
    q, k, v = qkv(rng, (2, 20, 8), (2, 50, 8))
    buf = np.empty((2, 20, 12), np.float32)
    out, lse = attention(q, k, v, out=buf, return_lse=True)
    assert out is buf
    _, ref_lse = reference(q, k, v, return_lse=True)
    assert_lse_matches(lse, ref_lse, np.float32)


# --- merging key chunks -----------------------------------------------------------------------


def merge(out1, lse1, out2, lse2):
    """Combine attention over two disjoint key sets (float64); a row empty in both stays 0/-inf."""
    out1, lse1, out2, lse2 = (np.asarray(x, np.float64) for x in (out1, lse1, out2, lse2))
    m = np.maximum(lse1, lse2)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    w1, w2 = np.exp(lse1 - m_safe), np.exp(lse2 - m_safe)
    total = w1 + w2
    has_key = total > 0
    denom = np.where(has_key, total, 1.0)[..., None]
    out = (w1[..., None] * out1 + w2[..., None] * out2) / denom
    lse = np.where(has_key, m_safe + np.log(np.where(has_key, total, 1.0)), -np.inf)
    return out, lse


def assert_merge_equals_one_call(chunk1, chunk2, whole, ref, dtype):
    """The merged chunks match the single call (and both match the reference)."""
    out, lse = merge(*chunk1, *chunk2)
    ref_out, ref_lse = ref
    assert_matches_reference(out.astype(dtype), ref_out, dtype)
    assert_lse_matches(lse.astype(lse_dtype(dtype)), ref_lse, dtype)
    one_out, one_lse = whole
    scale = max(1.0, np.max(np.abs(ref_out))) if ref_out.size else 1.0
    np.testing.assert_allclose(
        out, one_out.astype(np.float64), rtol=0, atol=2 * tolerance(dtype) * scale
    )
    np.testing.assert_array_equal(lse == -np.inf, one_lse == -np.inf)


@pytest.mark.parametrize("split", [1, 100, 256, 257, 599], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=float_id)
def test_merge_two_key_chunks(isa, rng, dtype, split):
    q, k, v = qkv(rng, (2, 3, 70, 16), (2, 3, 600, 16), dtype)
    c1 = attention(q, k[..., :split, :], v[..., :split, :], return_lse=True)
    c2 = attention(q, k[..., split:, :], v[..., split:, :], return_lse=True)
    whole = attention(q, k, v, return_lse=True)
    assert_merge_equals_one_call(c1, c2, whole, reference(q, k, v, return_lse=True), dtype)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_merge_with_mask_and_empty_chunk_rows(isa, rng, kind):
    q, k, v = qkv(rng, (2, 3, 70, 16), (2, 3, 400, 16))
    split = 150
    keep = rng.random((70, 400)) < 0.6
    keep[::4, :split] = False  # these rows have no key in chunk 1
    keep[1::4, split:] = False  # these rows have no key in chunk 2
    keep[2::8, :] = False  # and these none at all
    mask = keep if kind == "bool" else np.where(keep, rng.standard_normal(keep.shape), -np.inf)
    c1 = attention(q, k[..., :split, :], v[..., :split, :], mask[:, :split], return_lse=True)
    c2 = attention(q, k[..., split:, :], v[..., split:, :], mask[:, split:], return_lse=True)
    assert np.all(c1[1][..., ::4] == -np.inf) and np.all(c2[1][..., 1::4] == -np.inf)
    whole = attention(q, k, v, mask, return_lse=True)
    ref = reference(q, k, v, mask, return_lse=True)
    assert_merge_equals_one_call(c1, c2, whole, ref, np.float32)


def test_merge_with_kv_lengths(isa, rng):
    # lengths <= split leave chunk 2 empty for the whole (batch, head); 0 leaves both empty
    S, split = 500, 256
    q, k, v = qkv(rng, (4, 2, 9, 16), (4, 2, S, 16))
    lengths = np.array([[500, 257], [256, 3], [0, 499], [100, 256]])
    l1 = np.minimum(lengths, split)
    l2 = np.clip(lengths - split, 0, S - split)
    c1 = attention(q, k[..., :split, :], v[..., :split, :], kv_lengths=l1, return_lse=True)
    c2 = attention(q, k[..., split:, :], v[..., split:, :], kv_lengths=l2, return_lse=True)
    whole = attention(q, k, v, kv_lengths=lengths, return_lse=True)
    ref = reference(q, k, v, kv_lengths=lengths, return_lse=True)
    assert_merge_equals_one_call(c1, c2, whole, ref, np.float32)


@pytest.mark.parametrize(
    "L,S,split",
    [(64, 300, 236), (64, 300, 250), (64, 300, 100), (130, 130, 60), (5, 3000, 1500)],
    ids=["cache|new", "inside-new-keys", "inside-cache", "no-cache", "decode-split-k"],
)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_merge_chunked_causal_prefill(isa, rng, L, S, split, gqa):
    """Causal with bottom_right alignment over all S keys, as two chunks [0, split), [split, S).

    Query i sees key j iff j <= i + S - L. In chunk 2 (local index j - split) that is exactly
    causal bottom_right over S - split keys; in chunk 1 it is the window (None, S - split) with
    bottom_right alignment over `split` keys. Rows i < L - (S - split) have no key in chunk 2."""
    q, k, v = qkv(rng, (2, 4, L, 16), (2, 2 if gqa else 4, S, 16))
    kw = {"enable_gqa": gqa, "alignment": "bottom_right"}
    k1, v1, k2, v2 = k[..., :split, :], v[..., :split, :], k[..., split:, :], v[..., split:, :]
    c1 = attention(q, k1, v1, window=(None, S - split), return_lse=True, **kw)
    c2 = attention(q, k2, v2, is_causal=True, return_lse=True, **kw)
    empty_in_2 = L - (S - split)
    if empty_in_2 > 0:
        assert np.all(c2[1][..., :empty_in_2] == -np.inf)
        assert np.all(c2[0][..., :empty_in_2, :] == 0)
    whole = attention(q, k, v, is_causal=True, return_lse=True, **kw)
    ref = reference(q, k, v, is_causal=True, return_lse=True, **kw)
    assert_merge_equals_one_call(c1, c2, whole, ref, np.float32)


def test_merge_decode_sliding_window(isa, rng):
    # one new query, a cache of 4096 keys, window (1000, 0): chunk 1 [0, 3500) holds the oldest
    # 404 keys the window reaches, chunk 2 the rest; window (1000 - 596, 0) in chunk 1
    S, split, W = 4096, 3500, 1000
    q, k, v = qkv(rng, (2, 8, 1, 64), (2, 2, S, 64))
    kw = {"enable_gqa": True, "alignment": "bottom_right", "is_causal": True}
    c1 = attention(
        q,
        k[..., :split, :],
        v[..., :split, :],
        window=(W - (S - split), None),
        return_lse=True,
        **kw,
    )
    c2 = attention(q, k[..., split:, :], v[..., split:, :], window=(W, 0), return_lse=True, **kw)
    whole = attention(q, k, v, window=(W, 0), return_lse=True, **kw)
    ref = reference(q, k, v, window=(W, 0), return_lse=True, **kw)
    assert_merge_equals_one_call(c1, c2, whole, ref, np.float32)
