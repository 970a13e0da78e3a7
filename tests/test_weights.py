"""sdpa.attention_weights: the (..., L, S) probabilities, against reference.attention_weights;
rows sum to 1 (0 for a row with no key); weights @ value is the attention output."""

import numpy as np
import pytest
from conftest import ALIGNMENTS, check_weights

import sdpa

float_id = lambda d: np.dtype(d).name  # noqa: E731
B, H, E, Ev = 2, 3, 16, 8


def qk(rng, L, S, dtype=np.float32, batch=(B, H), kv_heads=None):
    kv_batch = batch if kv_heads is None else (*batch[:-1], kv_heads)
    q = rng.standard_normal((*batch, L, E)).astype(dtype)
    k = rng.standard_normal((*kv_batch, S, E)).astype(dtype)
    return q, k


@pytest.mark.parametrize("S", [1, 255, 256, 257, 600])
@pytest.mark.parametrize("L", [1, 64, 65])
def test_plain(isa, rng, L, S):
    q, k = qk(rng, L, S)
    w = check_weights(q, k)
    assert w.shape == (B, H, L, S)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_dtypes(isa, rng, dtype):
    q, k = qk(rng, 65, 300, dtype)
    assert check_weights(q, k, is_causal=True).dtype == dtype


@pytest.mark.parametrize(
    "dtypes,want",
    [
        ((np.float16, np.float32), np.float32),
        ((np.float32, np.float64), np.float64),
        ((np.float16, np.float16), np.float16),
    ],
    ids=["f16+f32", "f32+f64", "f16+f16"],
)
def test_result_type(isa, rng, dtypes, want):
    q = rng.standard_normal((3, 9, 8)).astype(dtypes[0])
    k = rng.standard_normal((3, 20, 8)).astype(dtypes[1])
    assert check_weights(q, k).dtype == want


@pytest.mark.parametrize(
    "shape",
    [(65, 300), (1, 300), (65, 1), (H, 65, 300), (B, 1, 65, 300)],
    ids=["LxS", "1xS", "Lx1", "HxLxS", "Bx1xLxS"],
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(isa, rng, kind, shape):
    q, k = qk(rng, 65, 300)
    if kind == "bool":
        mask = rng.random(shape) < 0.6
    else:
        mask = rng.standard_normal(shape).astype(np.float32)
        mask[rng.random(shape) < 0.2] = -np.inf
    check_weights(q, k, mask)


@pytest.mark.parametrize("LS", [(70, 300), (130, 130), (300, 70)], ids=["L<S", "L==S", "L>S"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_causal(isa, rng, alignment, LS):
    q, k = qk(rng, *LS)
    w = check_weights(q, k, is_causal=True, alignment=alignment)
    L, S = LS
    offset = S - L if alignment == "bottom_right" else 0
    above = np.arange(S)[None, :] > np.arange(L)[:, None] + offset
    assert np.all(w[..., above] == 0)


@pytest.mark.parametrize("window", [(5, None), (None, 3), (7, 2), (0, 0), (1000, 1000)], ids=str)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_window(isa, rng, alignment, window):
    q, k = qk(rng, 70, 300)
    check_weights(q, k, window=window, alignment=alignment)
    check_weights(q, k, window=window, alignment=alignment, is_causal=True)


def test_gqa(isa, rng):
    q, k = qk(rng, 33, 257, batch=(B, 6), kv_heads=2)
    w = check_weights(q, k, enable_gqa=True, is_causal=True)
    assert w.shape == (B, 6, 33, 257)


@pytest.mark.parametrize(
    "shape", [(H,), (B, H), (B, 1), ()], ids=["(H,)", "(B,H)", "(B,1)", "scalar"]
)
def test_alibi(isa, rng, shape):
    q, k = qk(rng, 65, 300)
    check_weights(q, k, alibi_slopes=rng.uniform(0, 1, shape), alignment="bottom_right")


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_softcap(isa, rng, kind):
    q, k = qk(rng, 65, 300)
    mask = None
    if kind == "bool":
        mask = rng.random((65, 300)) < 0.5
    elif kind == "float":
        mask = 3 * rng.standard_normal((65, 300)).astype(np.float32)
    check_weights(q, k, mask, softcap=2.0, scale=2.0)


def test_kv_lengths(isa, rng):
    q, k = qk(rng, 65, 300)
    lengths = np.array([[0, 1, 300], [255, 256, 257]])
    w = check_weights(q, k, kv_lengths=lengths)
    assert np.all(w[0, 0] == 0)
    for b in range(B):
        for h in range(H):
            assert np.all(w[b, h, :, lengths[b, h] :] == 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
@pytest.mark.parametrize("LS", [(70, 333), (333, 70)], ids=["L<S", "L>S"])
def test_combination(isa, rng, LS, dtype):
    q, k = qk(rng, *LS, dtype, batch=(B, 4), kv_heads=2)
    check_weights(
        q,
        k,
        rng.standard_normal(LS).astype(np.float32),
        is_causal=True,
        window=(40, 2),
        enable_gqa=True,
        kv_lengths=np.array([[0, 333, 150, 69], [70, 1, 2, 333]]) % (LS[1] + 1),
        alibi_slopes=0.1,
        softcap=5.0,
        alignment="bottom_right",
    )


def test_rows_with_no_key_are_zero(isa, rng):
    q, k = qk(rng, 90, 40)
    w = check_weights(q, k, is_causal=True, alignment="bottom_right")
    assert np.all(w[..., :50, :] == 0)
    np.testing.assert_allclose(w[..., 50:, :].sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("S", [255, 256, 257, 600, 2000])
def test_weights_times_value_is_the_output(isa, rng, S):
    q, k = qk(rng, 65, S, np.float64, batch=(B, 4), kv_heads=2)
    v = rng.standard_normal((B, 2, S, Ev))
    kwargs = {
        "is_causal": True,
        "alignment": "bottom_right",
        "enable_gqa": True,
        "window": (200, None),
        "kv_lengths": np.array([[S], [S // 3]]),
    }
    w = sdpa.attention_weights(q, k, **kwargs)
    out = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(w @ np.repeat(v, 2, axis=1), out, rtol=1e-10, atol=1e-12)


def test_weights_broadcast_batch(isa, rng):
    q = rng.standard_normal((H, 17, E)).astype(np.float32)
    k = rng.standard_normal((B, 1, 40, E)).astype(np.float32)
    assert check_weights(q, k).shape == (B, H, 17, 40)


@pytest.mark.parametrize("L,S", [(0, 10), (10, 0), (0, 0)])
def test_empty(isa, L, S):
    w = sdpa.attention_weights(np.ones((2, L, 4), np.float32), np.ones((2, S, 4), np.float32))
    assert w.shape == (2, L, S) and w.dtype == np.float32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"alignment": "diagonal"}, ValueError, "alignment"),
        ({"window": (-1, 0)}, ValueError, "window"),
        ({"window": ("a", 0)}, TypeError, "window"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"alibi_slopes": np.ones(H + 1)}, ValueError, "alibi_slopes"),
        ({"kv_lengths": np.array([[51], [0]])}, ValueError, "kv_lengths"),
        ({"kv_lengths": np.array([[5.0], [0.0]])}, TypeError, "kv_lengths"),
    ],
    ids=[
        "alignment",
        "window-negative",
        "window-str",
        "softcap-0",
        "alibi-shape",
        "kv-above-S",
        "kv-float",
    ],
)
def test_bad_arguments(kwargs, error, match):
    q = np.ones((B, H, 4, E), np.float32)
    k = np.ones((B, H, 50, E), np.float32)
    with pytest.raises(error, match=match):
        sdpa.attention_weights(q, k, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="key"):
        sdpa.attention_weights(np.ones((2, 5, 8), np.float32), np.ones((2, 6, 7), np.float32))
    with pytest.raises(TypeError, match="query"):
        sdpa.attention_weights(np.ones((2, 5, 8), np.int32), np.ones((2, 6, 8), np.float32))
