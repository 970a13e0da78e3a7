"""sdpa.merge_attention: attention over chunks of the keys, merged, is attention over them all."""

import numpy as np
import pytest
from conftest import assert_lse_matches, assert_matches_reference, reference

import sdpa


def chunked(q, k, v, bounds, mask=None, **kwargs):
    parts = [
        sdpa.scaled_dot_product_attention(
            q, k[..., a:b, :], v[..., a:b, :], None if mask is None else mask[..., a:b],
            return_lse=True, **kwargs,
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]  # fmt: skip
    return [o for o, _ in parts], [x for _, x in parts]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bounds", [[0, 300], [0, 1, 300], [0, 100, 101, 250, 300]], ids=str)
def test_merged_chunks_equal_one_call(rng, dtype, bounds):
    q = rng.standard_normal((2, 3, 40, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, 300, 16)).astype(dtype)
    v = rng.standard_normal((2, 3, 300, 8)).astype(dtype)
    mask = rng.random((40, 300)) < 0.7
    mask[5] = False  # a row with no key at all
    mask[6, 150:] = False  # a row with keys in some chunks only
    out, lse = sdpa.merge_attention(*chunked(q, k, v, bounds, mask))
    want, want_lse = reference(q, k, v, mask, return_lse=True)
    assert_matches_reference(out, want, dtype)
    assert_lse_matches(lse, want_lse, dtype)
    assert np.all(out[..., 5, :] == 0) and np.all(lse[..., 5] == -np.inf)


def test_the_readme_formula_gives_nan_where_the_helper_gives_zero(rng):
    q = rng.standard_normal((4, 8))
    k = rng.standard_normal((10, 8))
    mask = np.ones((4, 10), bool)
    mask[2] = False
    (o1, o2), (l1, l2) = chunked(q, k, k, [0, 5, 10], mask)
    with np.errstate(invalid="ignore"):
        m = np.maximum(l1, l2)
        naive = (np.exp(l1 - m)[:, None] * o1 + np.exp(l2 - m)[:, None] * o2) / (
            np.exp(l1 - m) + np.exp(l2 - m)
        )[:, None]
    assert np.isnan(naive[2]).all()
    out, lse = sdpa.merge_attention([o1, o2], [l1, l2])
    assert np.all(out[2] == 0) and lse[2] == -np.inf


def test_sinks_are_applied_once_at_the_merge(rng):
    q = rng.standard_normal((3, 20, 8))
    k = rng.standard_normal((3, 50, 8))
    sinks = np.array([0.5, -1.0, 2.0])
    out, lse = sdpa.merge_attention(*chunked(q, k, k, [0, 17, 50]), sinks=sinks)
    want, want_lse = sdpa.scaled_dot_product_attention(q, k, k, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_nan_in_a_chunk_reaches_the_merge(rng):
    q = rng.standard_normal((4, 8))
    k = rng.standard_normal((10, 8))
    k[7] = np.nan
    out, lse = sdpa.merge_attention(*chunked(q, k, k, [0, 5, 10]))
    assert np.isnan(out).all() and np.isnan(lse).all()


def test_bad_chunk_lists_are_value_errors():
    o = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="one lse per out"):
        sdpa.merge_attention([o, o], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="one lse per out"):
        sdpa.merge_attention([], [])
    with pytest.raises(ValueError, match=r"lses\[0\] of shape \(2,\) must be"):
        sdpa.merge_attention([o], [np.zeros(2)])


def test_bad_sinks_are_value_errors_naming_them(rng):
    o, x = np.zeros((2, 3, 4)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"sinks of shape \(5,\) must broadcast"):
        sdpa.merge_attention([o], [x], sinks=np.zeros(5))
    with pytest.raises(ValueError, match="sinks must be finite"):
        sdpa.merge_attention([o], [x], sinks=np.inf)
