"""Grouped-query and multi-query attention (enable_gqa=True)."""

import numpy as np
import pytest
from conftest import check

import sdpa

E, Ev = 16, 12


def qkv(rng, batch, hq, hkv, L, S, dtype=np.float32):
    q = rng.standard_normal((*batch, hq, L, E)).astype(dtype)
    k = rng.standard_normal((*batch, hkv, S, E)).astype(dtype)
    v = rng.standard_normal((*batch, hkv, S, Ev)).astype(dtype)
    return q, k, v


HEADS = [(8, 2), (4, 1), (6, 3), (4, 4), (12, 4)]
heads_id = "Hq{}-Hkv{}".format


@pytest.mark.parametrize("hq,hkv", HEADS, ids=[heads_id(*h) for h in HEADS])
@pytest.mark.parametrize(
    "L,S", [(1, 300), (1, 4096), (17, 70), (65, 65), (130, 257)], ids=lambda x: str(x)
)
def test_gqa(isa, rng, hq, hkv, L, S):
    check(*qkv(rng, (2,), hq, hkv, L, S), enable_gqa=True)


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["no-batch", "B3", "B2x2"])
def test_gqa_batch_dims(isa, rng, batch):
    check(*qkv(rng, batch, 8, 2, 33, 70), enable_gqa=True)


def test_gqa_float64(isa, rng):
    check(*qkv(rng, (2,), 8, 2, 40, 90, np.float64), enable_gqa=True)


def test_gqa_equals_repeated_heads(isa, rng):
    q, k, v = qkv(rng, (2,), 8, 2, 33, 70)
    grouped = sdpa.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    repeated = sdpa.scaled_dot_product_attention(
        q, np.repeat(k, 4, axis=-3), np.repeat(v, 4, axis=-3)
    )
    np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)
    # query head h reads kv head h // 4, not h % 2
    wrong = sdpa.scaled_dot_product_attention(q, np.tile(k, (1, 4, 1, 1)), np.tile(v, (1, 4, 1, 1)))
    assert not np.allclose(grouped, wrong, atol=1e-3)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(
    "mask_shape",
    [(33, 70), (1, 8, 33, 70), (2, 8, 1, 70), (8, 1, 1)],
    ids=["LxS", "1xHqxLxS", "BxHqx1xS", "Hqx1x1"],
)
def test_gqa_with_mask(isa, rng, kind, mask_shape):
    q, k, v = qkv(rng, (2,), 8, 2, 33, 70)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.6
    else:
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        mask[rng.random(mask_shape) < 0.2] = -np.inf
    check(q, k, v, mask, enable_gqa=True)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)], ids=[heads_id(8, 2), heads_id(4, 1)])
@pytest.mark.parametrize("L,S", [(33, 70), (70, 33), (1, 300), (2, 4096)], ids=lambda x: str(x))
def test_gqa_causal(isa, rng, hq, hkv, L, S):
    q, k, v = qkv(rng, (2,), hq, hkv, L, S)
    check(q, k, v, is_causal=True, enable_gqa=True)
    check(q, k, v, rng.random((L, S)) < 0.5, is_causal=True, enable_gqa=True)


def test_gqa_head_with_no_key_left(isa, rng):
    q, k, v = qkv(rng, (2,), 8, 2, 20, 40)
    mask = np.ones((8, 1, 40), bool)
    mask[5] = False
    out = check(q, k, v, mask, enable_gqa=True)
    assert np.all(out[:, 5] == 0.0) and np.all(out[:, 4] != 0.0)


def test_gqa_strided_key_value(isa, rng):
    q = rng.standard_normal((2, 8, 33, E), dtype=np.float32)
    # (B, S, Hkv, E) storage viewed as (B, Hkv, S, E)
    k = rng.standard_normal((2, 70, 2, E), dtype=np.float32).transpose(0, 2, 1, 3)
    v = rng.standard_normal((2, 70, 2, Ev), dtype=np.float32).transpose(0, 2, 1, 3)
    check(q, k, v, enable_gqa=True)


def test_mqa_without_enable_gqa_broadcasts(isa, rng):
    # one kv head broadcasts by ordinary NumPy rules even without enable_gqa
    q, k, v = qkv(rng, (2,), 4, 1, 33, 70)
    np.testing.assert_allclose(
        check(q, k, v),
        sdpa.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        rtol=1e-6,
        atol=1e-6,
    )
