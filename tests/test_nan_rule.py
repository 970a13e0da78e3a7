"""NaN and Inf in K or V reach exactly the output rows that attend their key, whatever rule
removes the key for the other rows and whatever path computes them (issue 9). sdpa.reference
follows the same rule."""

import numpy as np
import pytest
from conftest import reference

import sdpa
from sdpa import _core

L = S = 600


def nan_rows(out):
    return sorted(set(np.nonzero(np.isnan(out))[-2].tolist()))


def rules():
    """Equivalent ways of giving the same attended keys, each with the rows that attend key 599."""
    tril = np.tril(np.ones((L, S), bool))
    float_tril = np.where(tril, 0.0, -np.inf)
    short = np.arange(S) < 599
    return {
        "causal": ({"is_causal": True}, [599]),
        "bool-tril": ({"attn_mask": tril}, [599]),
        "float-tril": ({"attn_mask": float_tril}, [599]),
        "kv_lengths": ({"kv_lengths": 599}, []),
        "bool-short": ({"attn_mask": np.broadcast_to(short, (L, S))}, []),
        "float-short": ({"attn_mask": np.where(short, 0.0, -np.inf)}, []),
        "window": ({"window": (3, 0)}, [599]),
        "window-right": ({"window": (0, 2)}, [597, 598, 599]),
    }


@pytest.mark.parametrize("rule", sorted(rules()))
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_nan_reaches_exactly_the_rows_that_attend_its_key(isa, rng, rule, where, dtype):
    q = rng.standard_normal((1, L, 16)).astype(dtype)
    k = rng.standard_normal((1, S, 16)).astype(dtype)
    v = rng.standard_normal((1, S, 8)).astype(dtype)
    (k if where == "key" else v)[0, 599, 0] = np.nan
    kwargs, attending = rules()[rule]
    out = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    assert nan_rows(out) == attending
    assert nan_rows(reference(q, k, v, **kwargs)) == attending


@pytest.mark.parametrize("tiles", [(0, 0), (7, 13), (48, 64), (600, 600)])
def test_the_nan_rows_do_not_depend_on_tiling(isa, rng, tiles):
    q = rng.standard_normal((2, L, 16)).astype(np.float32)
    k = rng.standard_normal((2, S, 16)).astype(np.float32)
    v = rng.standard_normal((2, S, 8)).astype(np.float32)
    v[:, 300, 3] = np.inf
    v[1, 450, 0] = np.nan
    try:
        _core._set_tiles(*tiles)
        out = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        _core._set_tiles(0, 0)
    assert nan_rows(out[0]) == []  # +inf alone gives +inf, not NaN, in the rows that attend it
    assert np.all(np.isinf(out[0, 300:, 3])) and np.all(np.isfinite(out[0, :300]))
    assert nan_rows(out[1]) == list(range(450, L))


def test_split_keys_and_few_rows_follow_the_rule(isa, rng):
    # 2 query rows against 5000 keys: the few-row path, with the keys split across work items.
    q = rng.standard_normal((3, 2, 16)).astype(np.float32)
    k = rng.standard_normal((3, 5000, 16)).astype(np.float32)
    v = rng.standard_normal((3, 5000, 8)).astype(np.float32)
    v[:, 4000] = np.nan
    lengths = np.array([4000, 4001, 5000])
    out = sdpa.scaled_dot_product_attention(q, k, v, kv_lengths=lengths)
    assert not np.isnan(out[0]).any()
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()


def test_a_plus_inf_score_gives_lse_plus_inf(isa, rng):
    q = rng.standard_normal((2, 20, 8)).astype(np.float32)
    k = rng.standard_normal((2, 30, 8)).astype(np.float32)
    mask = np.zeros((20, 30), np.float32)
    mask[4, 7] = np.inf
    out, lse = sdpa.scaled_dot_product_attention(q, k, k, mask, return_lse=True)
    ref_out, ref_lse = reference(q, k, k, mask, return_lse=True)
    assert np.all(lse[:, 4] == np.inf) and np.all(ref_lse[:, 4] == np.inf)
    assert np.isnan(out[:, 4]).all() and np.isnan(ref_out[:, 4]).all()
    others = np.arange(20) != 4
    np.testing.assert_allclose(out[:, others], ref_out[:, others], rtol=1e-5, atol=1e-6)
    weights = sdpa.attention_weights(q, k, attn_mask=mask)
    ref_weights = sdpa.reference.attention_weights(q, k, attn_mask=mask)
    np.testing.assert_array_equal(np.isnan(weights), np.isnan(ref_weights))
    assert np.isnan(weights[:, 4, 7]).all() and np.all(np.delete(weights[:, 4], 7, axis=-1) == 0)
