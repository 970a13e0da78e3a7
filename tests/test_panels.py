"""The panel path (cpp/src/kernels/panel.hpp): float compute without masks, ALiBi, softcap or
weights, for tiles of more than 8 query rows. Query rows lie across the lanes of up to three
packets, so these tests aim at its edges: every way a tile splits into panels, padding lanes,
dimensions that are not a multiple of the packet or of the register block, partial key blocks
(causal, windows, kv_lengths), rows with no key, NaN confined to its own lane, and split-K."""

import numpy as np
import pytest
from conftest import assert_matches_reference, check, check_lse, reference

import sdpa
from sdpa import _core

# Tiles of up to 256 rows are whole (one tile), so each L below is one tile of L rows: 1, 2 or 3
# packets per panel on AVX-512 (16 lanes), several panels, and a lone last lane.
ROWS = [9, 16, 17, 31, 33, 48, 49, 64, 97, 128, 145, 197, 256]


@pytest.mark.parametrize("L", ROWS)
def test_every_panel_split(isa, rng, L):
    # E = 40 and Ev = 20 leave tails in the transposes (16 lanes) and the register blocks (8);
    # S = 77 leaves a tail of keys after the 8-key score blocks.
    q = rng.standard_normal((2, L, 40)).astype(np.float32)
    k = rng.standard_normal((2, 77, 40)).astype(np.float32)
    v = rng.standard_normal((2, 77, 20)).astype(np.float32)
    check_lse(q, k, v)
    check_lse(q, k, v, is_causal=True, alignment="bottom_right")


@pytest.mark.parametrize("L", [17, 64, 145])
def test_key_ranges_cut_through_blocks(isa, rng, L):
    # Small key blocks make most blocks partial for some lanes of a panel: the removed keys of
    # each lane are set to -inf after the scores, and the running max is taken again.
    q = rng.standard_normal((2, 3, L, 24)).astype(np.float32)
    k = rng.standard_normal((2, 3, 300, 24)).astype(np.float32)
    v = rng.standard_normal((2, 3, 300, 16)).astype(np.float32)
    lengths = np.array([[300, 120, 0], [1, 299, 64]])  # 0: every row of that head has no key
    try:
        for tiles in [(0, 0), (L, 16), (L, 40)]:
            _core._set_tiles(*tiles)
            check_lse(q, k, v, is_causal=True)
            check_lse(q, k, v, window=(30, 5), alignment="bottom_right")
            check_lse(q, k, v, kv_lengths=lengths, window=(None, 0))
    finally:
        _core._set_tiles(0, 0)


def test_split_k_with_panels(isa, rng):
    # 40 rows and 4096 keys: one tile per head, so the keys are split across work items and the
    # panels' partial results merged by log-sum-exp.
    q = rng.standard_normal((1, 2, 40, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 4096, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 4096, 32)).astype(np.float32)
    check_lse(q, k, v)
    check_lse(q, k, v, is_causal=True, alignment="bottom_right")


def test_large_scores_rescale_across_blocks(isa, rng):
    # Scores of +-60 that rise from block to block: each block's new max rescales the panel's
    # accumulator by a tiny alpha, lane by lane.
    q = rng.standard_normal((1, 50, 16)).astype(np.float32)
    k = rng.standard_normal((1, 600, 16)).astype(np.float32) * np.linspace(0.1, 3, 600)[:, None]
    v = rng.standard_normal((1, 600, 8)).astype(np.float32)
    try:
        for tiles in [(0, 0), (50, 64)]:
            _core._set_tiles(*tiles)
            check_lse(q, k, v, scale=4.0)
    finally:
        _core._set_tiles(0, 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_and_strided_views(isa, rng, dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(dtype)
    q = rng.standard_normal((2, 70, 2, 48)).astype(dt)[:, :, 0, ::2]  # (2, 70, 24), stride 2
    k = rng.standard_normal((2, 130, 24)).astype(dt)
    v = rng.standard_normal((2, 24, 130)).astype(dt).transpose(0, 2, 1)  # column-major values
    check(q, k, v, is_causal=True)
    out = np.empty((2, 70, 24), dt)[:, :, ::-1]  # out= with a negative column stride
    check(q, k, v, out=out)


@pytest.mark.parametrize("S", [100, 4096], ids=["one-item", "split-K"])
def test_nan_stays_in_its_lane(isa, rng, S):
    # One query row NaN: every score of that lane is NaN and the row max skips them all. The row
    # must still come out NaN (out and lse), also when split-K merges its partial results (it
    # once came out 0 with lse -inf there), and every other lane must stay exact.
    q = rng.standard_normal((1, 3, 64, 16)).astype(np.float32)
    k = rng.standard_normal((1, 3, S, 16)).astype(np.float32)
    v = rng.standard_normal((1, 3, S, 16)).astype(np.float32)
    q[0, 1, 37, 5] = np.nan  # one row of one panel
    keep = np.ones((1, 3, 64), bool)
    keep[0, 1, 37] = False
    for kwargs in ({}, {"is_causal": True, "alignment": "bottom_right"}):
        out, lse = sdpa.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
        assert np.isnan(out[0, 1, 37]).all() and np.isnan(lse[0, 1, 37])
        assert_matches_reference(out[keep], reference(q, k, v, **kwargs)[keep], np.float32)


def test_inf_keys_give_nan_rows_where_the_reference_does(isa, rng):
    q = rng.standard_normal((1, 3, 64, 16)).astype(np.float32)
    k = rng.standard_normal((1, 3, 100, 16)).astype(np.float32)
    v = rng.standard_normal((1, 3, 100, 16)).astype(np.float32)
    k[0, 2, 50, 3] = np.inf  # inf * q gives +-inf scores for every row of head 2: NaN rows there
    out = sdpa.scaled_dot_product_attention(q, k, v)
    with np.errstate(invalid="ignore"):  # the reference's inf - inf
        ref = reference(q, k, v)
    assert np.isnan(ref[0, 2]).any() and not np.isnan(ref[0, 2]).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
