"""The attention variants (alignment, window, alibi_slopes, softcap, kv_lengths) alone and
combined, against the reference; decode against long S (the split-K path); rows left with no
key; bad arguments; and a hypothesis property test over random combinations."""

import numpy as np
import pytest
from conftest import ALIGNMENTS, check, check_lse, reference, variant_problems
from hypothesis import HealthCheck, given, settings

import sdpa

attention = sdpa.scaled_dot_product_attention
float_id = lambda d: np.dtype(d).name  # noqa: E731
FLOATS = [np.float32, np.float64]
B, H, E, Ev = 2, 3, 16, 12

# (L, S) pairs: fewer queries than keys, square, more queries than keys. They cross the 64-row
# tile and the 256-key block so that partly masked and skipped blocks both occur.
LS = {"L<S": (70, 300), "L==S": (130, 130), "L>S": (300, 70)}


def qkv(rng, L, S, dtype=np.float32, batch=(B, H), kv_heads=None):
    """q (*batch, L, E); k, v (*batch[:-1], kv_heads or batch[-1], S, E or Ev)."""
    kv_batch = batch if kv_heads is None else (*batch[:-1], kv_heads)
    q = rng.standard_normal((*batch, L, E)).astype(dtype)
    k = rng.standard_normal((*kv_batch, S, E)).astype(dtype)
    v = rng.standard_normal((*kv_batch, S, Ev)).astype(dtype)
    return q, k, v


def check_empty_rows(q, k, v, mask=None, **kwargs):
    """check() plus: rows the reference leaves with no key are exactly 0; return (out, empty)."""
    out = check(q, k, v, mask, **kwargs)
    _, lse = reference(q, k, v, mask, return_lse=True, **kwargs)
    empty = lse == -np.inf
    assert np.all(out[np.broadcast_to(empty[..., None], out.shape)] == 0)
    return out, empty


# --- alignment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("LS", LS.values(), ids=LS.keys())
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_causal_alignment(isa, rng, dtype, alignment, LS):
    L, S = LS
    q, k, v = qkv(rng, L, S, dtype)
    _, empty = check_empty_rows(q, k, v, is_causal=True, alignment=alignment)
    # bottom_right with L > S leaves the first L - S rows with no key, and only those
    n_empty = L - S if alignment == "bottom_right" and L > S else 0
    assert np.array_equal(empty, np.broadcast_to(np.arange(L) < n_empty, empty.shape))


def test_alignments_agree_when_square(isa, rng):
    q, k, v = qkv(rng, 130, 130)
    for kwargs in ({"is_causal": True}, {"window": (9, 4)}, {"alibi_slopes": [0.1, 0.2, 0.3]}):
        top = attention(q, k, v, alignment="top_left", **kwargs)
        bottom = attention(q, k, v, alignment="bottom_right", **kwargs)
        np.testing.assert_allclose(top, bottom, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_alignment_alone_changes_nothing(isa, rng, alignment):
    # without causal, window or ALiBi there is no diagonal to place
    q, k, v = qkv(rng, 70, 300)
    out = check(q, k, v, alignment=alignment)
    np.testing.assert_allclose(out, attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_bottom_right_differs_from_top_left(isa, rng):
    q, k, v = qkv(rng, 70, 300)
    top = check(q, k, v, is_causal=True, alignment="top_left")
    bottom = check(q, k, v, is_causal=True, alignment="bottom_right")
    assert not np.allclose(top, bottom)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=float_id)
def test_causal_bottom_right_float16(isa, rng, dtype):
    q, k, v = qkv(rng, 65, 257, np.float16)
    check_empty_rows(q, k, v.astype(dtype), is_causal=True, alignment="bottom_right")


# --- window -------------------------------------------------------------------------------------

WINDOWS = {
    "(5,None)": (5, None),
    "(None,3)": (None, 3),
    "(7,2)": (7, 2),
    "(0,0)": (0, 0),
    "(0,None)": (0, None),
    "(None,0)": (None, 0),
    "(None,None)": (None, None),
    "(100,300)": (100, 300),  # crosses the 64-row tile and 256-key block edges
    "beyond-S": (1000, 1000),
    "huge": (2**40, 2**40),
    "list[3,4]": [3, 4],
    "numpy-ints": (np.int64(6), np.int32(1)),
}


@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
@pytest.mark.parametrize("LS", LS.values(), ids=LS.keys())
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_window(isa, rng, alignment, LS, window):
    q, k, v = qkv(rng, *LS)
    check_empty_rows(q, k, v, window=window, alignment=alignment)


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=float_id)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_window_dtypes(isa, rng, dtype, alignment):
    q, k, v = qkv(rng, 130, 300, dtype)
    check_empty_rows(q, k, v, window=(37, 5), alignment=alignment)


@pytest.mark.parametrize(
    "window,same_as",
    [((None, None), None), ((1000, 1000), None), ((None, 0), "causal")],
    ids=["unbounded", "beyond-S", "right-0"],
)
def test_window_equivalences(isa, rng, window, same_as):
    q, k, v = qkv(rng, 70, 300)
    out = attention(q, k, v, window=window)
    expected = attention(q, k, v, is_causal=same_as == "causal")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_window_0_0_picks_the_diagonal_value(isa, rng):
    q, k, v = qkv(rng, 70, 300, np.float64)
    for alignment, offset in (("top_left", 0), ("bottom_right", 230)):
        out = check(q, k, v, window=(0, 0), alignment=alignment)
        np.testing.assert_allclose(out, v[..., offset : offset + 70, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [(4, 7), (4, 0), (None, 9), (50, None)], ids=str)
@pytest.mark.parametrize("LS", LS.values(), ids=LS.keys())
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_window_with_causal(isa, rng, alignment, LS, window):
    q, k, v = qkv(rng, *LS)
    out, _ = check_empty_rows(q, k, v, is_causal=True, window=window, alignment=alignment)
    # is_causal is right = 0
    same = attention(q, k, v, window=(window[0], 0), alignment=alignment)
    np.testing.assert_allclose(out, same, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_window_with_mask(isa, rng, kind):
    q, k, v = qkv(rng, 70, 300)
    if kind == "bool":
        mask = rng.random((H, 70, 300)) < 0.7
    else:
        mask = rng.standard_normal((H, 70, 300)).astype(np.float32)
    check_empty_rows(q, k, v, mask, window=(20, 20), alignment="bottom_right")


# --- ALiBi --------------------------------------------------------------------------------------


def slopes_of(rng, shape):
    return rng.uniform(0.01, 1.0, shape)


ALIBI_SHAPES = {"(H,)": (H,), "(B,H)": (B, H), "(B,1)": (B, 1), "scalar": (), "(1,)": (1,)}


@pytest.mark.parametrize("shape", ALIBI_SHAPES.values(), ids=ALIBI_SHAPES.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_alibi(isa, rng, dtype, alignment, causal, shape):
    q, k, v = qkv(rng, 70, 300, dtype)
    slopes = slopes_of(rng, shape)
    out = check(q, k, v, alibi_slopes=slopes, is_causal=causal, alignment=alignment)
    assert not np.allclose(out, attention(q, k, v, is_causal=causal, alignment=alignment))


@pytest.mark.parametrize(
    "slopes",
    [[0.5, 0.25, 0.125], np.array([1, 2, 0]), np.float32(0.3), 0.3, np.array([-0.2, 0.0, 0.4])],
    ids=["list", "int-array", "numpy-scalar", "python-float", "mixed-sign"],
)
def test_alibi_slopes_forms(isa, rng, slopes):
    q, k, v = qkv(rng, 65, 257)
    check(q, k, v, alibi_slopes=slopes, is_causal=True, alignment="bottom_right")


def test_alibi_zero_slopes_change_nothing(isa, rng):
    q, k, v = qkv(rng, 70, 300)
    out = attention(q, k, v, alibi_slopes=np.zeros(H), is_causal=True)
    np.testing.assert_allclose(out, attention(q, k, v, is_causal=True), rtol=1e-6, atol=1e-6)


def test_alibi_per_query_head_with_gqa(isa, rng):
    q, k, v = qkv(rng, 33, 300, batch=(B, 8), kv_heads=2)
    check(q, k, v, alibi_slopes=2.0 ** -np.arange(1, 9), enable_gqa=True, is_causal=True)


def test_alibi_with_float_mask_and_window(isa, rng):
    q, k, v = qkv(rng, 70, 300, np.float64)
    mask = rng.standard_normal((70, 300))
    check_empty_rows(q, k, v, mask, alibi_slopes=slopes_of(rng, (B, H)), window=(40, 10))


@pytest.mark.parametrize(
    ("L", "S", "kv_length", "alignment"),
    [(1, 1024, 617, "bottom_right"), (3, 1500, 100, "bottom_right"), (40, 300, 50, "top_left")],
    ids=["decode", "decode-3", "prefill"],
)
def test_alibi_far_from_the_diagonal_keeps_float32_precision(isa, rng, L, S, kv_length, alignment):
    # Every surviving key lies hundreds of positions from the diagonal, so the ALiBi biases are
    # ~-400: in float32 the scores would lose their low digits (hypothesis found a 2e-5 error)
    # unless the kernel measures the bias from the nearest surviving key.
    q, k = (rng.standard_normal((1, 1, n, 12)).astype(np.float32) for n in (L, S))
    v = rng.standard_normal((1, 1, S, 5)).astype(np.float32)
    check_lse(
        q,
        k,
        v,
        alignment=alignment,
        alibi_slopes=np.array([0.96]),
        kv_lengths=np.array([kv_length]),
    )


def test_alibi_float16(isa, rng):
    q, k, v = qkv(rng, 65, 300, np.float16)
    check(q, k, v, alibi_slopes=slopes_of(rng, (H,)), is_causal=True, alignment="bottom_right")


# --- softcap ------------------------------------------------------------------------------------


def wrong_order_softcap(q, k, v, mask, softcap, scale):
    """softcap applied after the float mask: what the kernel must NOT compute."""
    s = scale * (q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) + mask
    s = softcap * np.tanh(s / softcap)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v.astype(np.float64)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0, 1e6])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_softcap(isa, rng, dtype, softcap):
    q, k, v = qkv(rng, 70, 300, dtype)
    out = check(q, k, v, softcap=softcap, scale=2.0)
    if softcap < 10:  # scores reach about 8 * sqrt(E) = 32 here, so a small cap matters
        assert not np.allclose(out, attention(q, k, v, scale=2.0), atol=1e-3)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_softcap_with_mask_and_causal(isa, rng, kind, alignment):
    q, k, v = qkv(rng, 70, 300)
    if kind == "bool":
        mask = rng.random((B, 1, 70, 300)) < 0.5
    else:
        mask = 4 * rng.standard_normal((B, 1, 70, 300)).astype(np.float32)
        mask[..., ::7] = -np.inf
    check_empty_rows(q, k, v, mask, softcap=2.0, is_causal=True, alignment=alignment)


def test_softcap_comes_before_the_float_mask(isa, rng):
    q, k, v = qkv(rng, 40, 100, np.float64)
    mask = 10 * rng.standard_normal((40, 100))  # large: capping it would change the result
    out = check(q, k, v, mask, softcap=1.0, scale=1.0)
    wrong = wrong_order_softcap(q, k, v, mask, 1.0, 1.0)
    assert np.max(np.abs(out - wrong)) > 1e-2


def test_softcap_comes_before_alibi(isa, rng):
    q, k, v = qkv(rng, 40, 100, np.float64)
    slopes = np.array([2.0, 1.0, 0.5])  # biases up to -200: far outside the cap of 1
    out = check(q, k, v, softcap=1.0, alibi_slopes=slopes, is_causal=True)
    rel = np.arange(100)[None, :] - np.arange(40)[:, None]
    bias = -slopes[:, None, None] * np.abs(rel)
    bias = np.where(rel <= 0, bias, -np.inf)
    wrong = wrong_order_softcap(q, k, v, bias, 1.0, 1.0 / np.sqrt(E))
    assert np.max(np.abs(out - wrong)) > 1e-2


def test_softcap_with_everything(isa, rng):
    q, k, v = qkv(rng, 70, 300, batch=(B, 4), kv_heads=2)
    check_lse(
        q,
        k,
        v,
        rng.standard_normal((70, 300)).astype(np.float32),
        softcap=3.0,
        scale=1.5,
        alibi_slopes=slopes_of(rng, (4,)),
        window=(80, 2),
        kv_lengths=np.array([[300], [111]]),
        enable_gqa=True,
        alignment="bottom_right",
    )


# --- kv_lengths ---------------------------------------------------------------------------------

KV_LENGTHS = {
    "(B,1)": np.array([[300], [129]]),
    "(B,H)": np.array([[0, 300, 1], [256, 257, 64]]),
    "(B,H)-all-S": np.full((B, H), 300),
    "(H,)": np.array([5, 0, 300]),
    "scalar": np.int64(200),
    "python-int": 77,
    "nested-list": [[1], [299]],
    "int32": np.array([[255], [257]], np.int32),
    "uint16": np.array([[17], [300]], np.uint16),
}


@pytest.mark.parametrize("lengths", KV_LENGTHS.values(), ids=KV_LENGTHS.keys())
@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_kv_lengths(isa, rng, dtype, lengths):
    q, k, v = qkv(rng, 70, 300, dtype)
    _, empty = check_empty_rows(q, k, v, kv_lengths=lengths)
    # a row is empty exactly when its length is 0
    zero = np.broadcast_to(np.asarray(lengths) == 0, (B, H))
    assert np.array_equal(empty, np.broadcast_to(zero[..., None], empty.shape))


def test_kv_lengths_equal_slicing_the_keys(isa, rng):
    q, k, v = qkv(rng, 70, 300)
    lengths = np.array([[300, 1, 256], [257, 100, 3]])
    out = attention(q, k, v, kv_lengths=lengths)
    for b in range(B):
        for h in range(H):
            n = lengths[b, h]
            sliced = attention(q[b, h], k[b, h, :n], v[b, h, :n])
            np.testing.assert_allclose(out[b, h], sliced, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_kv_lengths_with_mask_and_causal(isa, rng, kind, alignment):
    q, k, v = qkv(rng, 70, 300)
    if kind == "bool":
        mask = rng.random((70, 300)) < 0.7
    else:
        mask = rng.standard_normal((70, 300)).astype(np.float32)
    lengths = np.array([[0, 300, 50], [256, 257, 240]])
    check_empty_rows(q, k, v, mask, kv_lengths=lengths, is_causal=True, alignment=alignment)


def test_kv_lengths_float16(isa, rng):
    q, k, v = qkv(rng, 70, 300, np.float16)
    check_empty_rows(q, k, v, kv_lengths=np.array([[0], [211]]), is_causal=True)


def test_kv_lengths_broadcast_batch(isa, rng):
    # query (H, L, E) and key (B, H, S, E): kv_lengths broadcasts to query.shape[:-2] = (H,)
    q = rng.standard_normal((H, 20, E)).astype(np.float32)
    _, k, v = qkv(rng, 20, 300)
    out = check(q, k, v, kv_lengths=np.array([10, 0, 300]))
    assert out.shape == (B, H, 20, Ev)


# --- combinations -------------------------------------------------------------------------------

COMBO_LS = {"L<S": (70, 333), "L>S": (333, 70), "L==S": (129, 129)}


@pytest.mark.parametrize("LS", COMBO_LS.values(), ids=COMBO_LS.keys())
@pytest.mark.parametrize("lengths", ["(B,1)", "(B,Hq)"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_window_causal_gqa_kv_lengths_bottom_right(isa, rng, dtype, lengths, LS):
    L, S = LS
    q, k, v = qkv(rng, L, S, dtype, batch=(B, 6), kv_heads=2)
    if lengths == "(B,1)":
        kv_lengths = np.array([[S], [S // 2]])
    else:
        kv_lengths = rng.integers(0, S + 1, (B, 6))
        kv_lengths[0, :2] = (0, S)
    check_lse(
        q,
        k,
        v,
        is_causal=True,
        window=(45, 3),
        enable_gqa=True,
        kv_lengths=kv_lengths,
        alignment="bottom_right",
    )


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_everything_at_once(isa, rng, alignment):
    q, k, v = qkv(rng, 100, 300, batch=(B, 6), kv_heads=3)
    mask = rng.random((B, 6, 100, 300)) < 0.9
    check_lse(
        q,
        k,
        v,
        mask,
        is_causal=True,
        window=(120, 0),
        enable_gqa=True,
        kv_lengths=np.array([[290], [150]]),
        alibi_slopes=slopes_of(rng, (6,)),
        softcap=4.0,
        scale=0.5,
        alignment=alignment,
    )


# --- decode against long S (split-K: few query tiles and S >= 1024) ------------------------------


def decode_kwargs(name, S, rng):
    if name == "window":
        return {"window": (1000, 0)}
    if name == "causal-window-kv":
        # batch 0 full; batch 1 shorter: its diagonal follows its own length (FlashAttention's
        # rule), so its window holds its own last keys, not the padded S's
        return {"is_causal": True, "window": (700, None), "kv_lengths": np.array([[S], [S - 1500]])}
    if name == "kv-lengths":  # lengths at and around the key blocks and the split edges
        return {
            "kv_lengths": np.array(
                [[0, 1, 255, 1023, 1024, 1025, 2049, S], rng.integers(0, S + 1, 8)]
            )
        }
    assert name == "alibi-softcap"
    return {"alibi_slopes": 2.0 ** -np.arange(1, 9), "softcap": 5.0, "is_causal": True}


DECODE = ["window", "causal-window-kv", "kv-lengths", "alibi-softcap"]


@pytest.mark.parametrize("name", DECODE)
@pytest.mark.parametrize("S", [3000, 4096, 5000])
@pytest.mark.parametrize("L", [1, 3])
def test_decode_long_s_bottom_right(isa, rng, L, S, name):
    q, k, v = qkv(rng, L, S, batch=(B, 8), kv_heads=2)
    kwargs = decode_kwargs(name, S, rng)
    out, lse = check_lse(q, k, v, enable_gqa=True, alignment="bottom_right", **kwargs)
    if name == "causal-window-kv":
        assert np.all(np.isfinite(lse[1])) and np.all(out[1] != 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=float_id)
def test_decode_long_s_dtypes(isa, rng, dtype):
    q, k, v = qkv(rng, 1, 4096, dtype, batch=(1, 4))
    check_lse(
        q,
        k,
        v,
        alignment="bottom_right",
        is_causal=True,
        window=(2500, 0),
        kv_lengths=np.array([4096, 3000, 1100, 1024]),
    )


# --- rows with no key ---------------------------------------------------------------------------

NO_KEY = {
    "causal-bottom-right-L>S": (90, 40, {"is_causal": True, "alignment": "bottom_right"}),
    "window-(0,0)-L>S": (90, 40, {"window": (0, 0)}),
    # (top-left: bottom-right diagonals follow kv_lengths, FlashAttention's rule for ragged rows)
    "window-past-kv-length": (40, 90, {"window": (0, None), "kv_lengths": 10}),
    "q-lengths-padding": (40, 90, {"q_lengths": 25, "kv_lengths": 60, "alignment": "bottom_right"}),
    "kv-lengths-0": (40, 300, {"kv_lengths": 0}),
    "window-before-kv-length": (
        40,
        300,
        {"window": (3, 3), "kv_lengths": np.array([[300], [1]]), "alignment": "bottom_right"},
    ),
    "softcap-all-masked": (40, 300, {"softcap": 1.0, "kv_lengths": np.array([0, 3, 0])}),
    "alibi-all-masked": (40, 300, {"alibi_slopes": 5.0, "kv_lengths": np.array([[0], [300]])}),
}


@pytest.mark.parametrize("L,S,kwargs", NO_KEY.values(), ids=NO_KEY.keys())
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=float_id)
def test_rows_with_no_key_are_zero(isa, rng, dtype, L, S, kwargs):
    q, k, v = qkv(rng, L, S, dtype)
    out, lse = check_lse(q, k, v, **kwargs)
    assert np.any(lse == -np.inf)
    assert np.all(out[lse == -np.inf] == 0)
    assert not np.signbit(out[lse == -np.inf]).any()  # +0, not -0


def test_fully_masked_with_float_mask_and_softcap(isa, rng):
    q, k, v = qkv(rng, 40, 300)
    mask = np.zeros((40, 300), np.float32)
    mask[5:9] = -np.inf
    out, lse = check_lse(q, k, v, mask, softcap=2.0, alibi_slopes=0.5)
    assert np.all(out[:, :, 5:9] == 0) and np.all(lse[:, :, 5:9] == -np.inf)


REMOVED = {
    "bool-mask": lambda L, S: ({"attn_mask": np.arange(S) % 3 != 1}, np.arange(S) % 3 == 1),
    "float-mask": lambda L, S: (
        {"attn_mask": np.where(np.arange(S) % 3 == 1, -np.inf, 0.0).astype(np.float32)},
        np.arange(S) % 3 == 1,
    ),
    "causal": lambda L, S: ({"is_causal": True}, np.arange(S) >= L),
    "window": lambda L, S: (
        {"window": (10, 0), "alignment": "bottom_right"},
        np.arange(S) < S - L - 10,
    ),
    "kv-lengths": lambda L, S: ({"kv_lengths": 201}, np.arange(S) >= 201),
}


@pytest.mark.parametrize("removal", REMOVED.values(), ids=REMOVED.keys())
@pytest.mark.parametrize("dtype", FLOATS, ids=float_id)
def test_removed_keys_carry_exactly_zero_weight(isa, rng, dtype, removal):
    # huge (finite) values under removed keys: any weight above 0, even a denormal, shows
    L, S = 70, 300
    kwargs, removed = removal(L, S)
    q, k, v = qkv(rng, L, S, dtype)
    v[..., removed, :] = np.finfo(dtype).max / 2
    mask = kwargs.pop("attn_mask", None)
    check_empty_rows(q, k, v, mask, **kwargs)


# --- bad arguments ------------------------------------------------------------------------------

BAD = {
    "alignment-diagonal": ({"alignment": "diagonal"}, ValueError, "alignment"),
    "alignment-None": ({"alignment": None}, (ValueError, TypeError), "alignment"),
    "window-negative": ({"window": (-1, 0)}, ValueError, "window"),
    "window-negative-right": ({"window": (None, -3)}, ValueError, "window"),
    "window-triple": ({"window": (1, 2, 3)}, (ValueError, TypeError), "window"),
    "window-single": ({"window": (1,)}, (ValueError, TypeError), "window"),
    "window-int": ({"window": 5}, (ValueError, TypeError), "window"),
    "window-str": ({"window": ("a", 0)}, TypeError, "window"),
    "window-float": ({"window": (1.5, 0)}, TypeError, "window"),
    "window-bool": ({"window": (True, 0)}, TypeError, "window"),
    "softcap-0": ({"softcap": 0}, ValueError, "softcap"),
    "softcap-negative": ({"softcap": -1.0}, ValueError, "softcap"),
    "softcap-inf": ({"softcap": float("inf")}, ValueError, "softcap"),
    "softcap-nan": ({"softcap": float("nan")}, ValueError, "softcap"),
    "softcap-str": ({"softcap": "1"}, TypeError, "softcap"),
    "alibi-(H+1,)": ({"alibi_slopes": np.ones(H + 1)}, ValueError, "alibi_slopes"),
    "alibi-(B,H,1)": ({"alibi_slopes": np.ones((B, H, 1))}, ValueError, "alibi_slopes"),
    "alibi-(3,B,H)": ({"alibi_slopes": np.ones((3, B, H))}, ValueError, "alibi_slopes"),
    "alibi-nan": ({"alibi_slopes": np.array([0.1, np.nan, 0.2])}, ValueError, "alibi_slopes"),
    "alibi-inf": ({"alibi_slopes": np.inf}, ValueError, "alibi_slopes"),
    "alibi-str": ({"alibi_slopes": np.array(["a", "b", "c"])}, TypeError, "alibi_slopes"),
    "kv-negative": ({"kv_lengths": np.array([[-1], [5]])}, ValueError, "kv_lengths"),
    "kv-above-S": ({"kv_lengths": np.array([[51], [5]])}, ValueError, "kv_lengths"),
    "kv-float": ({"kv_lengths": np.array([[3.0], [5.0]])}, TypeError, "kv_lengths"),
    "kv-python-float": ({"kv_lengths": 3.0}, TypeError, "kv_lengths"),
    "kv-bool": ({"kv_lengths": np.array([True, False, True])}, TypeError, "kv_lengths"),
    "kv-(B,H,1)": ({"kv_lengths": np.ones((B, H, 1), int)}, ValueError, "kv_lengths"),
    "kv-(H+1,)": ({"kv_lengths": np.ones(H + 1, int)}, ValueError, "kv_lengths"),
}


@pytest.mark.parametrize("kwargs,error,match", BAD.values(), ids=BAD.keys())
def test_bad_arguments(kwargs, error, match):
    q = np.ones((B, H, 4, E), np.float32)
    kv = np.ones((B, H, 50, E), np.float32)
    with pytest.raises(error, match=match):
        attention(q, kv, kv, **kwargs)


def test_alibi_slopes_per_kv_head_rejected_with_gqa():
    q = np.ones((B, 8, 4, E), np.float32)
    kv = np.ones((B, 2, 50, E), np.float32)
    with pytest.raises(ValueError, match="alibi_slopes"):
        attention(q, kv, kv, enable_gqa=True, alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match="kv_lengths"):
        attention(q, kv, kv, enable_gqa=True, kv_lengths=np.ones((B, 2), int))


def test_kv_lengths_may_equal_s_and_0():
    q = np.ones((B, H, 4, E), np.float32)
    kv = np.ones((B, H, 50, E), np.float32)
    out = attention(q, kv, kv, kv_lengths=np.array([[0], [50]]))
    assert np.all(out[0] == 0) and np.allclose(out[1], 1.0)


# --- property test ------------------------------------------------------------------------------

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@fixture_ok
@given(problem=variant_problems())
def test_random_variant_combinations(isa, problem):
    q, k, v, mask, kwargs = problem
    check_lse(q, k, v, mask, **kwargs)
