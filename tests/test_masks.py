"""Boolean and additive masks, every broadcast shape, is_causal, and rows left with no key."""

import numpy as np
import pytest
from conftest import check

import sdpa

B, H, L, S, E, Ev = 2, 3, 65, 300, 16, 12

# Mask shapes broadcastable to (B, H, L, S).
MASK_SHAPES = {
    "LxS": (L, S),
    "1xS": (1, S),
    "Lx1": (L, 1),
    "S": (S,),
    "1x1": (1, 1),
    "HxLxS": (H, L, S),
    "Bx1xLxS": (B, 1, L, S),
    "1xHx1xS": (1, H, 1, S),
    "1x1xLx1": (1, 1, L, 1),
    "BxHxLxS": (B, H, L, S),
    "Bx1x1x1": (B, 1, 1, 1),
}


def qkv(rng, q_shape, kv_shape, dtype=np.float32, ev=Ev):
    q = rng.standard_normal(q_shape).astype(dtype)
    k = rng.standard_normal(kv_shape).astype(dtype)
    v = rng.standard_normal((*kv_shape[:-1], ev)).astype(dtype)
    return q, k, v


def bool_mask(rng, shape, p=0.7):
    return rng.random(shape) < p


def float_mask(rng, shape, p_inf=0.1):
    mask = rng.standard_normal(shape).astype(np.float32)
    mask[rng.random(shape) < p_inf] = -np.inf
    return mask


@pytest.mark.parametrize("shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes(isa, rng, kind, shape):
    q, k, v = qkv(rng, (B, H, L, E), (B, H, S, E))
    mask = bool_mask(rng, shape) if kind == "bool" else float_mask(rng, shape)
    out = check(q, k, v, mask)
    assert out.shape == (B, H, L, Ev)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_leading_dims_extend_the_batch(isa, rng, kind):
    q, k, v = qkv(rng, (H, 17, E), (H, 70, E))
    shape = (B, H, 17, 70)
    mask = bool_mask(rng, shape) if kind == "bool" else float_mask(rng, shape)
    assert check(q, k, v, mask).shape == (B, H, 17, Ev)


@pytest.mark.parametrize("mask_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mask_dtypes(isa, rng, dtype, mask_dtype):
    q, k, v = qkv(rng, (H, 33, E), (H, 129, E), dtype)
    mask = float_mask(rng, (33, 129)).astype(mask_dtype)
    out = check(q, k, v, mask)
    assert out.dtype == dtype


def test_float_mask_changes_the_result(isa, rng):
    q, k, v = qkv(rng, (H, 33, E), (H, 129, E))
    mask = 3 * rng.standard_normal((33, 129)).astype(np.float32)
    assert not np.allclose(check(q, k, v, mask), sdpa.scaled_dot_product_attention(q, k, v))


def test_all_true_mask_and_zero_float_mask_change_nothing(isa, rng):
    q, k, v = qkv(rng, (H, 70, E), (H, 300, E))
    plain = sdpa.scaled_dot_product_attention(q, k, v)
    ones = sdpa.scaled_dot_product_attention(q, k, v, np.ones((70, 300), bool))
    zeros = sdpa.scaled_dot_product_attention(q, k, v, np.zeros((70, 300), np.float32))
    np.testing.assert_allclose(ones, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zeros, plain, rtol=1e-6, atol=1e-6)


CAUSAL_SHAPES = [
    (5, 9),
    (9, 5),
    (1, 100),
    (100, 1),
    (1, 4096),
    (3, 4096),
    (64, 300),
    (300, 64),
    (65, 65),
    (129, 513),
    (1000, 1000),
]


@pytest.mark.parametrize("L_,S_", CAUSAL_SHAPES, ids=lambda x: str(x))
def test_causal(isa, rng, L_, S_):
    q, k, v = qkv(rng, (2, L_, E), (2, S_, E))
    check(q, k, v, is_causal=True)


def test_causal_float64(isa, rng):
    q, k, v = qkv(rng, (2, 130, E), (2, 70, E), np.float64)
    check(q, k, v, is_causal=True)


def test_causal_first_row_sees_only_the_first_key(isa, rng):
    q, k, v = qkv(rng, (3, 20, E), (3, 40, E))
    out = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)


def test_causal_equals_explicit_lower_triangular_mask(isa, rng):
    q, k, v = qkv(rng, (2, 70, E), (2, 300, E))
    tri = np.tri(70, 300, dtype=bool)
    np.testing.assert_allclose(
        sdpa.scaled_dot_product_attention(q, k, v, is_causal=True),
        sdpa.scaled_dot_product_attention(q, k, v, tri),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("L_,S_", [(65, 300), (300, 65), (17, 17)], ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_and_mask_combine(isa, rng, kind, L_, S_):
    q, k, v = qkv(rng, (B, H, L_, E), (B, H, S_, E))
    mask = bool_mask(rng, (B, 1, L_, S_), 0.5) if kind == "bool" else float_mask(rng, (L_, S_))
    check(q, k, v, mask, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_exactly_zero(isa, rng, kind):
    q, k, v = qkv(rng, (2, 130, E), (2, 300, E))
    empty_rows = [0, 5, 63, 64, 65, 129]
    if kind == "bool":
        mask = bool_mask(rng, (130, 300))
        mask[empty_rows] = False
    else:
        mask = float_mask(rng, (130, 300))
        mask[empty_rows] = -np.inf
    out = check(q, k, v, mask)
    assert np.all(out[:, empty_rows] == 0.0)
    others = np.setdiff1d(np.arange(130), empty_rows)
    assert np.all(np.abs(out[:, others]).max(axis=-1) > 0)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_everything_masked_gives_zeros(isa, rng, kind, dtype):
    q, k, v = qkv(rng, (2, 70, E), (2, 300, E), dtype)
    mask = np.zeros((70, 300), bool) if kind == "bool" else np.full((70, 300), -np.inf)
    out = sdpa.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.zeros((2, 70, Ev), dtype))


def test_causal_with_mask_leaving_a_row_empty(isa, rng):
    q, k, v = qkv(rng, (2, 20, E), (2, 20, E))
    mask = np.ones((20, 20), bool)
    mask[:, 0] = False  # row 0 only had key 0 under causal
    out = check(q, k, v, mask, is_causal=True)
    assert np.all(out[:, 0] == 0.0) and np.all(out[:, 1:] != 0.0)


def test_head_fully_masked(isa, rng):
    q, k, v = qkv(rng, (B, H, 40, E), (B, H, 90, E))
    mask = np.ones((1, H, 1, 90), bool)
    mask[0, 1] = False
    out = check(q, k, v, mask)
    assert np.all(out[:, 1] == 0.0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_whole_key_blocks_masked(isa, rng, kind):
    # keys [0, 256) and [512, 700) masked out: entire key blocks contribute nothing
    q, k, v = qkv(rng, (2, 70, E), (2, 700, E))
    keep = np.ones(700, bool)
    keep[:256] = False
    keep[512:] = False
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    out = check(q, k, v, mask)
    np.testing.assert_allclose(
        out,
        sdpa.scaled_dot_product_attention(q, k[:, 256:512], v[:, 256:512]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "keep",
    ["none", "3000-3010", "last", "first", "second-half", "every-97th"],
)
def test_decode_long_keys_with_sparse_mask(isa, rng, keep):
    # L = 1 against S = 4096: the shape a kernel may split over keys; splits with no key left
    # must not poison the merge
    q, k, v = qkv(rng, (4, 1, 64), (4, 4096, 64), ev=64)
    mask = np.zeros(4096, bool)
    if keep == "3000-3010":
        mask[3000:3010] = True
    elif keep == "last":
        mask[-1] = True
    elif keep == "first":
        mask[0] = True
    elif keep == "second-half":
        mask[2048:] = True
    elif keep == "every-97th":
        mask[::97] = True
    for m in (mask, np.where(mask, 0.0, -np.inf)):
        out = check(q, k, v, m)
        assert np.all(out == 0.0) if keep == "none" else np.all(np.abs(out).max(axis=-1) > 0)


def test_float_mask_with_large_finite_negatives(isa, rng):
    q, k, v = qkv(rng, (2, 33, E), (2, 129, E))
    mask = np.where(rng.random((33, 129)) < 0.5, -1e4, 0.0).astype(np.float32)
    mask[:, 7] = 0.0  # every row keeps at least one key at bias 0
    check(q, k, v, mask)
