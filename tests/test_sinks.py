"""Attention sinks (gpt-oss): exp(sink) joins each row's softmax denominator, with no value.
Judged against the reference and against the definition written out by hand; every inner path
is covered by tests/test_options.py."""

import numpy as np
import pytest
from conftest import check_lse

import sdpa


def by_hand(q, k, v, sinks):
    """o = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink}), lse = log(sum_j e^{s_j} + e^{sink})."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    e = np.exp(s)
    total = e.sum(-1) + np.exp(np.asarray(sinks))[..., None]
    return (e @ v) / total[..., None], np.log(total)


def test_the_definition(isa, rng):
    q = rng.standard_normal((3, 7, 8))
    k = rng.standard_normal((3, 11, 8))
    v = rng.standard_normal((3, 11, 5))
    sinks = np.array([-1.0, 0.5, 3.0])
    out, lse = sdpa.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    want_out, want_lse = by_hand(q, k, v, sinks)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    # a sink only shrinks the output towards 0: out = o_plain * exp(lse_plain - lse)
    plain, plain_lse = sdpa.scaled_dot_product_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, plain * np.exp(plain_lse - lse)[..., None], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_rows_with_no_key_give_zero_and_the_sink_as_lse(isa, rng, dtype):
    q = rng.standard_normal((2, 40, 16)).astype(dtype)
    k = rng.standard_normal((2, 50, 16)).astype(dtype)
    v = rng.standard_normal((2, 50, 16)).astype(dtype)
    sinks = np.array([0.25, -2.0])
    lengths = np.array([0, 30])  # every row of batch 0 has no key
    out, lse = check_lse(q, k, v, sinks=sinks, kv_lengths=lengths)
    assert np.all(out[0] == 0)
    np.testing.assert_allclose(lse[0], 0.25, rtol=1e-6)


def test_sinks_with_every_modifier_and_split_keys(isa, rng):
    # ALiBi shifts the kernel's scores internally; the sink must move with them. 3 rows x 3000
    # keys also splits the keys across work items, whose merge must add the sink once.
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 3000, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 3000, 8)).astype(np.float32)
    kwargs = dict(
        enable_gqa=True,
        sinks=np.array([1.0, -1.0, 4.0, 0.0]),
        alibi_slopes=np.array([0.01, 0.5, 0.0, 2.0]),
        window=(500, 0),
        alignment="bottom_right",
        softcap=20.0,
    )
    check_lse(q, k, v, **kwargs)
    mask = rng.random((3, 3000)) < 0.9
    check_lse(q, k, v, mask, **kwargs)


def test_weights_with_sinks_sum_to_less_than_one(isa, rng):
    q = rng.standard_normal((2, 5, 8))
    k = rng.standard_normal((2, 9, 8))
    sinks = np.array([1.0, -3.0])
    weights = sdpa.attention_weights(q, k, sinks=sinks)
    expected = sdpa.reference.attention_weights(q, k, sinks=sinks)
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-14)
    _, lse = sdpa.scaled_dot_product_attention(q, k, k, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(weights.sum(-1), 1 - np.exp(sinks[:, None] - lse), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.array([np.nan]), np.array([np.inf])], ids=["nan", "inf"])
def test_sinks_must_be_finite(bad):
    q = np.ones((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="sinks must be finite"):
        sdpa.scaled_dot_product_attention(q, q, q, sinks=bad)


def test_sinks_must_broadcast_to_the_heads():
    q = np.ones((3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"sinks of shape \(2,\) must broadcast"):
        sdpa.scaled_dot_product_attention(q, q, q, sinks=np.zeros(2))
    with pytest.raises(TypeError, match="sinks must have a real dtype"):
        sdpa.scaled_dot_product_attention(q, q, q, sinks=np.array(["a"]))
