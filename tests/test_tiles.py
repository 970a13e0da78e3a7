"""Tile and block edges: the planner's tile sizes are shape-dependent (and 128 rows x 512 keys by
default), so these tests force odd sizes through the benchmark-only override and check every
code path at its edges: partial row tiles, partial key blocks, the <= 8-row streaming path, the
whole-tile path and split-K merging."""

import numpy as np
import pytest
from conftest import check, check_lse, check_weights

from sdpa import _core


@pytest.fixture(params=[(0, 0), (7, 13), (8, 32), (9, 16), (64, 256), (3, 512)],
                ids=lambda t: "default" if t == (0, 0) else f"{t[0]}x{t[1]}")  # fmt: skip
def tiles(request):
    _core._set_tiles(*request.param)
    yield request.param
    _core._set_tiles(0, 0)


@pytest.mark.parametrize(
    "L,S", [(1, 1), (5, 70), (33, 33), (127, 129), (128, 512), (129, 513), (257, 255), (2, 1500)]
)
def test_edges_plain_and_causal(isa, rng, tiles, L, S):
    q = rng.standard_normal((2, 2, L, 12)).astype(np.float32)
    k = rng.standard_normal((2, 2, S, 12)).astype(np.float32)
    v = rng.standard_normal((2, 2, S, 20)).astype(np.float32)
    check(q, k, v)
    check(q, k, v, is_causal=True, alignment="bottom_right")


@pytest.mark.parametrize("L,S", [(3, 1100), (40, 300)])
def test_edges_with_every_variant(isa, rng, tiles, L, S):
    q = rng.standard_normal((2, 4, L, 8))
    k = rng.standard_normal((2, 2, S, 8))
    v = rng.standard_normal((2, 2, S, 5))
    mask = rng.random((L, S)) < 0.8
    kwargs = dict(
        enable_gqa=True,
        is_causal=True,
        alignment="bottom_right",
        window=(200, None),
        alibi_slopes=np.array([0.1, 0.2, 0.0, 0.05]),
        softcap=4.0,
        kv_lengths=np.array([[S - 7], [S // 2]]),
    )
    check_lse(q, k, v, mask, **kwargs)
    check_weights(q, k, mask, **kwargs)


def test_forced_tiles_do_not_change_results_across_threads(rng, tiles):
    import sdpa

    q = rng.standard_normal((3, 2, 50, 16)).astype(np.float32)
    k = rng.standard_normal((3, 2, 700, 16)).astype(np.float32)
    before = sdpa.get_num_threads()
    try:
        sdpa.set_num_threads(1)
        one = sdpa.scaled_dot_product_attention(q, k, k, is_causal=True)
        sdpa.set_num_threads(2)
        two = sdpa.scaled_dot_product_attention(q, k, k, is_causal=True)
    finally:
        sdpa.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
