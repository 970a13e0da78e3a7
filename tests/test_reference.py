"""Checks on the judge itself: sdpa.reference against hand-computed and loop-based answers."""

import math

import numpy as np
import pytest

from sdpa import reference as ref


def loop_attention(
    q,
    k,
    v,
    *,
    mask=None,
    is_causal=False,
    scale=None,
    group=1,
    bottom_right=False,
    window=None,
    slopes=None,
    softcap=None,
    lengths=None,
):
    """Row-by-row attention for (H, L, E) inputs written as plainly as possible (no broadcasting,
    no vectorised softmax), independent of the reference's code path. Returns (out, lse).
    With bottom_right, query i's diagonal is i + len_k - L (len_k: the head's length, or S)."""
    H, L, E = q.shape
    S, Ev = k.shape[1], v.shape[2]
    scale = (1.0 / math.sqrt(E) if E else 1.0) if scale is None else scale
    out = np.zeros((H, L, Ev))
    lse = np.full((H, L), -np.inf)
    for h in range(H):
        hk = h // group
        len_k = S if lengths is None else lengths[h]
        for i in range(L):
            d = i + (len_k - L if bottom_right else 0)
            logits = {}
            for j in range(S):
                if mask is not None and mask.dtype == bool and not mask[h, i, j]:
                    continue
                if is_causal and j > d:
                    continue
                if window is not None and window[0] is not None and j < d - window[0]:
                    continue
                if window is not None and window[1] is not None and j > d + window[1]:
                    continue
                if lengths is not None and j >= lengths[h]:
                    continue
                s = scale * float(np.dot(q[h, i], k[hk, j]))
                if softcap is not None:
                    s = softcap * math.tanh(s / softcap)
                if mask is not None and mask.dtype != bool:
                    s += mask[h, i, j]
                if slopes is not None:
                    s -= slopes[h] * abs(j - d)
                if s != -math.inf:
                    logits[j] = s
            if not logits:
                continue
            m = max(logits.values())
            total = sum(math.exp(s - m) for s in logits.values())
            for j, s in logits.items():
                out[h, i] += math.exp(s - m) / total * v[hk, j]
            lse[h, i] = m + math.log(total)
    return out, lse


def test_zero_query_gives_uniform_weights(rng):
    q = np.zeros((4, 3))
    k = rng.standard_normal((6, 3))
    v = rng.standard_normal((6, 5))
    w = ref.attention_weights(q, k)
    np.testing.assert_allclose(w, np.full((4, 6), 1 / 6), rtol=1e-15)
    np.testing.assert_allclose(
        ref.scaled_dot_product_attention(q, k, v),
        np.broadcast_to(v.mean(axis=0), (4, 5)),
        rtol=1e-14,
    )


def test_hand_computed_two_keys():
    # scores [0, ln 3] -> weights [1/4, 3/4]
    q = np.array([[1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    v = np.array([[4.0, 0.0], [0.0, 8.0]])
    out, lse = ref.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    np.testing.assert_allclose(out, [[1.0, 6.0]], rtol=1e-15)
    np.testing.assert_allclose(lse, [math.log(4.0)], rtol=1e-15)


def test_default_scale_is_inverse_sqrt_e():
    # E = 4: scores are q.k / 2, so [0, 2 ln 3] -> [0, ln 3] -> weights [1/4, 3/4]
    q = np.array([[1.0, 1.0, 0.0, 0.0]])
    k = np.array([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), math.log(3.0), 0.0, 0.0]])
    w = ref.attention_weights(q, k)
    np.testing.assert_allclose(w, [[0.25, 0.75]], rtol=1e-15)


def test_one_hot_key_selects_its_value():
    k = np.eye(5)
    v = np.arange(15.0).reshape(5, 3)
    q = 100.0 * np.eye(5)[[3, 1]]
    out = ref.scaled_dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out, v[[3, 1]], atol=1e-30)


def test_fully_masked_rows_give_zero_and_minus_inf_lse(rng):
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    bool_mask = np.ones((3, 5), dtype=bool)
    bool_mask[1] = False
    float_mask = np.zeros((3, 5))
    float_mask[2] = -np.inf
    for mask, row in [(bool_mask, 1), (float_mask, 2)]:
        out, lse = ref.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
        assert np.all(out[row] == 0.0)
        assert lse[row] == -np.inf
        assert np.all(np.isfinite(np.delete(out, row, axis=0)))
        assert np.all(ref.attention_weights(q, k, attn_mask=mask)[row] == 0.0)


def test_causal_alignment_with_fewer_queries_than_keys():
    q, k = np.zeros((2, 1)), np.zeros((4, 1))
    top_left = ref.attention_weights(q, k, is_causal=True)
    bottom_right = ref.attention_weights(q, k, is_causal=True, alignment="bottom_right")
    np.testing.assert_allclose(top_left, [[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0]], rtol=1e-15)
    np.testing.assert_allclose(bottom_right, [[1 / 3, 1 / 3, 1 / 3, 0], [1 / 4] * 4], rtol=1e-15)


def test_bottom_right_causal_with_more_queries_than_keys_leaves_empty_rows():
    q, k, v = np.zeros((4, 1)), np.zeros((2, 1)), np.ones((2, 1))
    out = ref.scaled_dot_product_attention(q, k, v, is_causal=True, alignment="bottom_right")
    np.testing.assert_array_equal(out, [[0.0], [0.0], [1.0], [1.0]])


def test_window_band():
    q, k = np.zeros((5, 1)), np.zeros((5, 1))
    allowed = ref.attention_weights(q, k, window=(1, 0)) > 0
    np.testing.assert_array_equal(allowed, np.tri(5, dtype=bool) & ~np.tri(5, k=-2, dtype=bool))
    allowed = ref.attention_weights(q, k, window=(None, 1)) > 0
    np.testing.assert_array_equal(allowed, np.tri(5, k=1, dtype=bool))
    both = ref.attention_weights(q, k, window=(2, None), is_causal=True) > 0
    np.testing.assert_array_equal(both, ref.attention_weights(q, k, window=(2, 0)) > 0)


def test_alibi_hand_computed():
    # scores 0 - ln2 * |j| -> weights proportional to 1, 1/2, 1/4
    w = ref.attention_weights(
        np.zeros((1, 1, 2)), np.zeros((1, 3, 2)), alibi_slopes=np.array([math.log(2.0)])
    )
    np.testing.assert_allclose(w, [[[4 / 7, 2 / 7, 1 / 7]]], rtol=1e-15)


def test_softcap_bounds_scores():
    q = np.array([[1.0]])
    k = np.array([[0.0], [1000.0]])
    # scores [0, 1000] capped to [0, 2 tanh(500)] ~ [0, 2]
    w = ref.attention_weights(q, k, scale=1.0, softcap=2.0)
    np.testing.assert_allclose(w, [[1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]], rtol=1e-14)


def test_kv_lengths_equal_truncated_keys(rng):
    q = rng.standard_normal((2, 3, 4, 5))
    k = rng.standard_normal((2, 3, 6, 5))
    v = rng.standard_normal((2, 3, 6, 2))
    lengths = np.array([[2], [6]])  # broadcast over the three heads
    out = ref.scaled_dot_product_attention(q, k, v, kv_lengths=lengths)
    for b, n in enumerate([2, 6]):
        np.testing.assert_allclose(
            out[b], ref.scaled_dot_product_attention(q[b], k[b, :, :n], v[b, :, :n]), rtol=1e-14
        )


def test_lse_merges_key_halves(rng):
    q = rng.standard_normal((3, 7, 8))
    k = rng.standard_normal((3, 20, 8))
    v = rng.standard_normal((3, 20, 5))
    full, lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True)
    out1, lse1 = ref.scaled_dot_product_attention(q, k[:, :9], v[:, :9], return_lse=True)
    out2, lse2 = ref.scaled_dot_product_attention(q, k[:, 9:], v[:, 9:], return_lse=True)
    merged_lse = np.logaddexp(lse1, lse2)
    merged = (
        np.exp(lse1 - merged_lse)[..., None] * out1 + np.exp(lse2 - merged_lse)[..., None] * out2
    )
    np.testing.assert_allclose(merged_lse, lse, rtol=1e-13)
    np.testing.assert_allclose(merged, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (6, 6), (1, 12)], ids=lambda x: str(x))
def test_matches_loop_implementation_with_everything(rng, L, S, alignment):
    Hq, Hkv, E, Ev = 4, 2, 3, 2
    q = rng.standard_normal((Hq, L, E))
    k = rng.standard_normal((Hkv, S, E))
    v = rng.standard_normal((Hkv, S, Ev))
    bool_mask = rng.random((Hq, L, S)) < 0.8
    float_mask = rng.standard_normal((Hq, L, S))
    slopes = np.array([0.5, 0.25, 0.125, 0.0])
    lengths = np.array([S, S - 1, 2, 0])
    for mask in (bool_mask, float_mask):
        kwargs = dict(is_causal=True, scale=0.7, window=(3, 1), softcap=1.5)
        out, lse = ref.scaled_dot_product_attention(
            q,
            k,
            v,
            mask,
            enable_gqa=True,
            alignment=alignment,
            alibi_slopes=slopes,
            kv_lengths=lengths,
            return_lse=True,
            **kwargs,
        )
        expected_out, expected_lse = loop_attention(
            q,
            k,
            v,
            mask=mask,
            group=Hq // Hkv,
            bottom_right=alignment == "bottom_right",
            slopes=slopes,
            lengths=lengths,
            **kwargs,
        )
        np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(lse == -np.inf, expected_lse == -np.inf)
        np.testing.assert_allclose(lse, expected_lse, rtol=1e-12)
        assert np.any(lse == -np.inf) and np.any(np.isfinite(lse))


def test_matches_loop_implementation_plain(rng):
    q = rng.standard_normal((2, 8, 5))
    k = rng.standard_normal((2, 11, 5))
    v = rng.standard_normal((2, 11, 3))
    out = ref.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, loop_attention(q, k, v)[0], rtol=1e-12, atol=1e-14)


def test_broadcast_batch_and_mask_dims(rng):
    q = rng.standard_normal((2, 1, 4, 3))
    k = rng.standard_normal((1, 3, 5, 3))
    v = rng.standard_normal((3, 5, 2))
    mask = rng.random((2, 3, 1, 5)) < 0.7
    out = ref.scaled_dot_product_attention(q, k, v, mask)
    assert out.shape == (2, 3, 4, 2)
    for b in range(2):
        for h in range(3):
            expected, _ = loop_attention(
                q[b, 0][None],
                k[0, h][None],
                v[h][None],
                mask=np.broadcast_to(mask[b, h], (1, 4, 5)),
            )
            np.testing.assert_allclose(out[b, h], expected[0], rtol=1e-12, atol=1e-14)


def test_empty_dims():
    assert ref.scaled_dot_product_attention(
        np.ones((2, 0, 3)), np.ones((2, 4, 3)), np.ones((2, 4, 5))
    ).shape == (2, 0, 5)
    out, lse = ref.scaled_dot_product_attention(
        np.ones((2, 3, 3)), np.ones((2, 0, 3)), np.ones((2, 0, 5)), return_lse=True
    )
    np.testing.assert_array_equal(out, np.zeros((2, 3, 5)))
    assert np.all(lse == -np.inf)
    # E == 0: all scores 0, uniform weights
    out = ref.scaled_dot_product_attention(np.ones((3, 0)), np.ones((4, 0)), np.eye(4))
    np.testing.assert_allclose(out, np.full((3, 4), 0.25), rtol=1e-15)


@pytest.mark.parametrize(
    "dtype,lse_dtype",
    [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)],
    ids=["float16", "float32", "float64"],
)
def test_result_dtypes(dtype, lse_dtype):
    x = np.ones((2, 3), dtype=dtype)
    out, lse = ref.scaled_dot_product_attention(x, x, x, return_lse=True)
    assert out.dtype == dtype and lse.dtype == lse_dtype
    mixed = ref.scaled_dot_product_attention(x, x.astype(np.float32), x)
    assert mixed.dtype == np.result_type(dtype, np.float32)


def test_out_argument_is_filled_and_returned(rng):
    q = rng.standard_normal((3, 4))
    out = np.empty((3, 4))
    assert ref.scaled_dot_product_attention(q, q, q, out=out) is out
    np.testing.assert_array_equal(out, ref.scaled_dot_product_attention(q, q, q))


def test_gqa_rejects_non_multiple_heads():
    with pytest.raises(ValueError, match="heads"):
        ref.scaled_dot_product_attention(
            np.ones((3, 2, 4)), np.ones((2, 2, 4)), np.ones((2, 2, 4)), enable_gqa=True
        )
