"""q_offset and kv_offset: a call over a chunk of the queries and keys relates them by their
positions in the full sequences, so chunks computed apart and merged give the full call."""

import numpy as np
import pytest

import sdpa

VARIANTS = {
    "causal": {"is_causal": True},
    "window": {"window": (30, 5)},
    "causal-window-alibi": {
        "is_causal": True,
        "window": (50, None),
        "alibi_slopes": np.array([0.2, 0.05]),
    },
    "causal-softcap": {"is_causal": True, "softcap": 4.0},
}


def chunks(n, size):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_chunks_with_offsets_merge_into_the_full_call(isa, rng, variant, alignment, dtype):
    L, S = 70, 190
    q = rng.standard_normal((2, 2, L, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, S, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, S, 8)).astype(dtype)
    kwargs = VARIANTS[variant]
    full, full_lse = sdpa.scaled_dot_product_attention(
        q, k, v, alignment=alignment, return_lse=True, **kwargs
    )
    shift = S - L if alignment == "bottom_right" else 0  # the full call's diagonal shift
    out = np.empty_like(full)
    lse = np.empty_like(full_lse)
    for qa, qb in chunks(L, 32):
        parts = [
            sdpa.scaled_dot_product_attention(
                q[..., qa:qb, :], k[..., ka:kb, :], v[..., ka:kb, :], q_offset=qa + shift,
                kv_offset=ka, return_lse=True, **kwargs,
            )
            for ka, kb in chunks(S, 64)
        ]  # fmt: skip
        out[..., qa:qb, :], lse[..., qa:qb] = sdpa.merge_attention(*zip(*parts))
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, full, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, full_lse, rtol=tol)


def test_offsets_are_per_head_and_match_the_reference(rng):
    q = rng.standard_normal((3, 20, 8))
    k = rng.standard_normal((3, 40, 8))
    kwargs = dict(is_causal=True, q_offset=np.array([0, 10, 25]), kv_offset=np.array([5, 0, 3]))
    got = sdpa.scaled_dot_product_attention(q, k, k, **kwargs)
    want = sdpa.reference.scaled_dot_product_attention(q, k, k, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for h in range(3):  # the same as a slice of one bigger causal call
        qo, ko = kwargs["q_offset"][h], kwargs["kv_offset"][h]
        big_q = np.concatenate([np.zeros((qo, 8)), q[h]])
        big_k = np.concatenate([np.zeros((ko, 8)), k[h]])
        # the keys before kv_offset are not in the chunk: compare with them masked out
        keep = np.arange(ko + 40) >= ko
        masked = sdpa.reference.scaled_dot_product_attention(
            big_q, big_k, big_k, keep, is_causal=True
        )
        np.testing.assert_allclose(got[h], masked[qo:], rtol=1e-12, atol=1e-14)


def test_offsets_must_be_integers():
    q = np.ones((1, 3, 4), np.float32)
    with pytest.raises(TypeError, match="q_offset must have an integer dtype"):
        sdpa.scaled_dot_product_attention(q, q, q, q_offset=np.array([1.5]))


@pytest.mark.parametrize("window", [(8, None), (None, 8), (50, 50)])
def test_a_window_wider_than_the_chunk_still_applies_across_offsets(rng, window):
    # A side >= L + S removes nothing within one call's own positions, but with offsets the
    # keys may lie further away than that: such a side must still remove them.
    q = rng.standard_normal((2, 4, 8))
    k = rng.standard_normal((2, 4, 8))
    kwargs = dict(window=window, q_offset=np.array([100, 3]), kv_offset=np.array([0, 103]))
    got = sdpa.scaled_dot_product_attention(q, k, k, return_lse=True, **kwargs)
    want = sdpa.reference.scaled_dot_product_attention(q, k, k, return_lse=True, **kwargs)
    np.testing.assert_array_equal(got[1] == -np.inf, want[1] == -np.inf)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-14)
