"""Ragged batches: q_lengths and kv_lengths with FlashAttention's per-sequence diagonal.

FlashAttention puts a query's causal/window/ALiBi diagonal at its own sequence's key length:
query i of a sequence with len_q queries and len_k keys has diagonal i + len_k - len_q. The judge
here is that rule reimplemented the plain way: each sequence cut to its true lengths and given to
the reference with alignment="bottom_right"; padding rows must come out 0 with lse -inf."""

import numpy as np
import pytest
from conftest import assert_lse_matches, assert_matches_reference

import sdpa

# (max_len_q, max_len_k) pairs from FlashAttention's test grid, cut to a CPU test's size
PAIRS = [(1, 147), (3, 799), (113, 203), (128, 217), (108, 256), (127, 512), (64, 64), (40, 9)]
VARIANTS = {
    "causal": {"is_causal": True},
    "window": {"window": (7, 2)},
    "causal-window": {"is_causal": True, "window": (20, None)},
    "alibi": {"is_causal": True, "alibi_slopes": np.array([0.1, 0.3])},
    "plain": {},
}


def per_sequence(q, k, v, len_q, len_k, **kwargs):
    """The rule written out: each sequence alone, at its true lengths, bottom-right aligned."""
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    lse = np.full(q.shape[:-1], -np.inf)
    for b in range(q.shape[0]):
        n, m = len_q[b], len_k[b]
        o, x = sdpa.reference.scaled_dot_product_attention(
            q[b, :, :n], k[b, :, :m], v[b, :, :m], alignment="bottom_right", return_lse=True,
            **kwargs,
        )  # fmt: skip
        out[b, :, :n], lse[b, :, :n] = o, x
    return out, lse


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("L,S", PAIRS, ids=[f"{a}x{b}" for a, b in PAIRS])
def test_flash_attentions_rule_for_ragged_batches(isa, rng, L, S, variant):
    q = rng.standard_normal((3, 2, L, 24)).astype(np.float32)
    k = rng.standard_normal((3, 2, S, 24)).astype(np.float32)
    v = rng.standard_normal((3, 2, S, 16)).astype(np.float32)
    len_q = np.array([L, max(L - 5, 0), rng.integers(0, L + 1)])
    len_k = np.array([S - rng.integers(0, 20) if S > 20 else S, S, rng.integers(0, S + 1)])
    kwargs = VARIANTS[variant]
    out, lse = sdpa.scaled_dot_product_attention(
        q, k, v, q_lengths=len_q[:, None], kv_lengths=len_k[:, None], alignment="bottom_right",
        return_lse=True, **kwargs,
    )  # fmt: skip
    want, want_lse = per_sequence(q, k, v, len_q, len_k, **kwargs)
    assert_matches_reference(out, want, np.float32)
    assert_lse_matches(lse, want_lse.astype(np.float64), np.float32)
    for b in range(3):
        assert np.all(out[b, :, len_q[b] :] == 0) and np.all(lse[b, :, len_q[b] :] == -np.inf)


def test_without_lengths_nothing_changes(rng):
    q = rng.standard_normal((2, 9, 8))
    k = rng.standard_normal((2, 30, 8))
    a = sdpa.scaled_dot_product_attention(q, k, k, is_causal=True, alignment="bottom_right")
    b = sdpa.scaled_dot_product_attention(
        q, k, k, is_causal=True, alignment="bottom_right", q_lengths=9, kv_lengths=30
    )
    np.testing.assert_array_equal(a, b)


def test_top_left_ignores_the_lengths_in_the_diagonal(rng):
    q = rng.standard_normal((2, 9, 8))
    k = rng.standard_normal((2, 30, 8))
    got = sdpa.scaled_dot_product_attention(q, k, k, is_causal=True, kv_lengths=np.array([20, 5]))
    for b, m in enumerate((20, 5)):  # diag(i) = i: key j <= i, and j < len_k
        want = sdpa.reference.scaled_dot_product_attention(q[b], k[b, :m], k[b, :m], is_causal=True)
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)


def test_padding_rows_ignore_sinks(rng):
    q = rng.standard_normal((1, 6, 8))
    out, lse = sdpa.scaled_dot_product_attention(
        q, q, q, q_lengths=4, sinks=np.array([1.0]), return_lse=True
    )
    assert np.all(out[:, 4:] == 0) and np.all(lse[:, 4:] == -np.inf)
    assert np.all(np.isfinite(lse[:, :4]))


@pytest.mark.parametrize("bad", [-1, 7], ids=["negative", "beyond-L"])
def test_q_lengths_must_lie_in_0_to_L(bad):
    q = np.ones((2, 6, 4), np.float32)
    with pytest.raises(ValueError, match=r"q_lengths must lie in \[0, L\] = \[0, 6\]"):
        sdpa.scaled_dot_product_attention(q, q, q, q_lengths=bad)
    with pytest.raises(TypeError, match="q_lengths must have an integer dtype"):
        sdpa.scaled_dot_product_attention(q, q, q, q_lengths=2.5)
