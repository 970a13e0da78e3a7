"""Bad input is a ValueError or TypeError naming the argument; empty dims are not errors."""

import numpy as np
import pytest
from conftest import check

import sdpa

attention = sdpa.scaled_dot_product_attention


def arrays(*shapes, dtype=np.float32):
    return [np.ones(s, dtype) for s in shapes]


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 5, 8), (2, 6, 7), (2, 6, 4)), "key"),  # E of key != E of query
        (((5, 8), (6, 8), (7, 4)), "value"),  # S of value != S of key
        (((8,), (6, 8), (6, 4)), "query"),  # fewer than 2 dims
        (((5, 8), (8,), (6, 4)), "key"),
        (((5, 8), (6, 8), (4,)), "value"),
        (((), (6, 8), (6, 4)), "query"),
        (((2, 5, 8), (3, 6, 8), (3, 6, 4)), "query|key"),  # batch dims do not broadcast
        (((2, 5, 8), (2, 6, 8), (3, 6, 4)), "value"),
    ],
    ids=[
        "E-mismatch",
        "S-mismatch",
        "query-1d",
        "key-1d",
        "value-1d",
        "query-0d",
        "batch-mismatch",
        "value-batch-mismatch",
    ],
)
def test_bad_shapes(shapes, match):
    with pytest.raises(ValueError, match=match):
        attention(*arrays(*shapes))


def test_shape_errors_show_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5, 8\).*\(2, 6, 7\)"):
        attention(*arrays((2, 5, 8), (2, 6, 7), (2, 6, 4)))


@pytest.mark.parametrize(
    "q_heads,kv_heads", [(8, 3), (4, 8), (6, 4)], ids=["8-over-3", "4-over-8", "6-over-4"]
)
def test_gqa_heads_not_a_multiple(q_heads, kv_heads):
    q, k, v = arrays((2, q_heads, 5, 8), (2, kv_heads, 6, 8), (2, kv_heads, 6, 4))
    with pytest.raises(ValueError, match="head"):
        attention(q, k, v, enable_gqa=True)


def test_gqa_needs_head_dims():
    with pytest.raises(ValueError, match="query"):
        attention(*arrays((5, 8), (6, 8), (6, 4)), enable_gqa=True)


def test_grouped_heads_without_enable_gqa_is_an_error():
    q, k, v = arrays((2, 8, 5, 8), (2, 2, 6, 8), (2, 2, 6, 4))
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, k, v)


@pytest.mark.parametrize(
    "mask_shape",
    [(5, 7), (4, 6), (6, 5), (7,), (3, 5, 6), (2, 2, 5, 6)],
    ids=["S-wrong", "L-wrong", "transposed", "1d-wrong", "batch-wrong", "batch-2-vs-3"],
)
@pytest.mark.parametrize("dtype", [np.bool_, np.float32], ids=["bool", "float"])
def test_mask_that_does_not_broadcast(mask_shape, dtype):
    q, k, v = arrays((3, 2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 4))
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, np.ones(mask_shape, dtype))


def test_mask_not_broadcasting_over_gqa_heads():
    q, k, v = arrays((8, 5, 8), (2, 6, 8), (2, 6, 4))
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, np.ones((2, 5, 6), bool), enable_gqa=True)


@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        attention(*arrays((5, 8), (6, 8), (6, 4)), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", [0.5], 1j], ids=["str", "list", "complex"])
def test_non_real_scale(scale):
    with pytest.raises(TypeError, match="scale"):
        attention(*arrays((5, 8), (6, 8), (6, 4)), scale=scale)


BAD_DTYPES = [
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
    np.complex64,
    np.complex128,
    object,
    np.longdouble,
]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("position", [0, 1, 2], ids=["query", "key", "value"])
def test_unsupported_dtypes(position, bad):
    inputs = arrays((5, 8), (6, 8), (6, 8))
    inputs[position] = inputs[position].astype(bad)
    name = ["query", "key", "value"][position]
    with pytest.raises(TypeError, match=name) as info:
        attention(*inputs)
    assert "float32" in str(info.value)  # the message lists the accepted dtypes


def test_string_input():
    with pytest.raises(TypeError, match="query"):
        attention(np.array([["a", "b"]]), *arrays((6, 2), (6, 4)))


@pytest.mark.parametrize(
    "bad", [np.int8, np.int64, np.uint8, np.complex64, object], ids=lambda d: np.dtype(d).name
)
def test_unsupported_mask_dtypes(bad):
    q, k, v = arrays((5, 8), (6, 8), (6, 4))
    with pytest.raises(TypeError, match="attn_mask"):
        attention(q, k, v, np.ones((5, 6), bad))


def test_errors_leave_out_untouched():
    out = np.full((5, 4), 3.0, np.float32)
    with pytest.raises(ValueError):
        attention(*arrays((5, 8), (6, 8), (6, 4)), scale=np.nan, out=out)
    assert np.all(out == 3.0)


# Empty dims are valid input.


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64], ids=["float16", "float32", "float64"]
)
def test_no_queries_gives_empty_output(isa, dtype):
    out = attention(*arrays((2, 3, 0, 8), (2, 3, 6, 8), (2, 3, 6, 5), dtype=dtype))
    assert out.shape == (2, 3, 0, 5) and out.dtype == dtype


@pytest.mark.parametrize("is_causal", [False, True], ids=["plain", "causal"])
def test_no_keys_gives_zeros(isa, rng, is_causal):
    q = rng.standard_normal((2, 5, 8), dtype=np.float32)
    k, v = arrays((2, 0, 8), (2, 0, 4))
    out = attention(q, k, v, is_causal=is_causal)
    np.testing.assert_array_equal(out, np.zeros((2, 5, 4), np.float32))
    out = np.full((2, 5, 4), np.nan, np.float32)
    attention(q, k, v, np.ones((5, 0), bool), out=out)
    np.testing.assert_array_equal(out, 0.0)


def test_empty_batch_gives_empty_output(isa):
    out = attention(*arrays((0, 3, 5, 8), (0, 3, 6, 8), (0, 3, 6, 4)))
    assert out.shape == (0, 3, 5, 4)
    out = attention(*arrays((0, 5, 8), (1, 6, 8), (6, 4)))
    assert out.shape == (0, 5, 4)


def test_empty_gqa_heads(isa):
    out = attention(*arrays((2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 4)), enable_gqa=True)
    assert out.shape == (2, 0, 5, 4)


def test_empty_value_features(isa):
    out = attention(*arrays((2, 5, 8), (2, 6, 8), (2, 6, 0)))
    assert out.shape == (2, 5, 0)


def test_empty_embedding_gives_uniform_weights(isa, rng):
    # E = 0: every score is 0 (scale defaults to 1), so each row is the mean of the values
    v = rng.standard_normal((2, 6, 4))
    out = check(np.ones((2, 5, 0)), np.ones((2, 6, 0)), v)
    np.testing.assert_allclose(
        out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), atol=1e-14
    )


# Found in review: edge cases of argument handling.


def test_huge_window_sides_are_unbounded(rng):
    q = rng.standard_normal((1, 9, 8))
    k = rng.standard_normal((1, 6, 8))
    v = rng.standard_normal((1, 6, 5))
    for window, align in (((None, 2**63 - 1), "top_left"), ((2**63 - 1, None), "bottom_right"),
                          ((2**64, 2**70), "top_left")):  # fmt: skip
        got = sdpa.scaled_dot_product_attention(q, k, v, window=window, alignment=align)
        want = sdpa.reference.scaled_dot_product_attention(q, k, v, alignment=align)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        w = sdpa.attention_weights(q, k, window=window, alignment=align)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)


def test_float64_mask_beyond_float32_range_saturates(rng):
    q = rng.standard_normal((3, 4)).astype(np.float32)
    v = rng.standard_normal((3, 4)).astype(np.float32)
    mask = np.full((3, 3), -1e39)
    mask[:, 0] = -np.inf  # -inf stays -inf
    got = sdpa.scaled_dot_product_attention(q, q, v, mask)
    want = sdpa.reference.scaled_dot_product_attention(
        q.astype(np.float64), q.astype(np.float64), v.astype(np.float64), mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got != 0)  # keys 1 and 2 remain: not a row without keys


def test_out_with_non_native_byte_order_receives_the_result(rng):
    q = rng.standard_normal((2, 5, 4)).astype(np.float32)
    out = np.empty((2, 5, 4), dtype=">f4")
    result = sdpa.scaled_dot_product_attention(q, q, q, out=out)
    assert result is out
    np.testing.assert_allclose(out, sdpa.reference.scaled_dot_product_attention(q, q, q), rtol=1e-5)


def test_self_overlapping_out_is_rejected(rng):
    q = rng.standard_normal((2, 5, 4)).astype(np.float32)
    base = np.empty((5, 4), np.float32)
    out = np.lib.stride_tricks.as_strided(base, (2, 5, 4), (0,) + base.strides)
    with pytest.raises(ValueError, match="out must not overlap itself"):
        sdpa.scaled_dot_product_attention(q, q, q, out=out)


def test_float16_with_bfloat16_follows_numpy_or_names_the_operands():
    # (a float16 query over a bfloat16 key and value is mixed storage, not an error: test_mixed.py)
    import ml_dtypes

    q = np.ones((2, 4), np.float16)
    k = np.ones((2, 4), ml_dtypes.bfloat16)
    try:
        np.result_type(q, k, q)
    except TypeError:  # ml_dtypes before 0.7: no common type
        with pytest.raises(TypeError, match=r"query, key and value \(float16, bfloat16, float16\)"):
            sdpa.scaled_dot_product_attention(q, k, q)
    else:  # ml_dtypes 0.7 and later: float32, as NumPy says (test_bf16.py checks the values)
        assert sdpa.scaled_dot_product_attention(q, k, q).dtype == np.result_type(q, k, q)


@pytest.mark.parametrize("n", [2**31, 10**6])
def test_absurd_thread_counts_are_value_errors(n):
    before = sdpa.get_num_threads()
    with pytest.raises(ValueError, match="n must be between 1 and"):
        sdpa.set_num_threads(n)
    assert sdpa.get_num_threads() == before
