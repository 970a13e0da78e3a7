"""Any strides give correct results: transposed views, negative strides, Fortran order, byte
order, non-contiguous innermost dims, zero strides, and strided masks and outputs."""

import numpy as np
import pytest
from conftest import check

import sdpa

B, H, L, S, E, Ev = 2, 3, 65, 130, 16, 8


def layout(x, how):
    """The same values as ``x`` in another memory layout."""
    if how == "contiguous":
        return np.ascontiguousarray(x)
    if how == "bshd":  # stored (B, L, H, D), viewed (B, H, L, D) like a fused projection output
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if how == "reversed-rows":
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if how == "reversed-cols":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    if how == "reversed-batch":
        return np.ascontiguousarray(x[::-1])[::-1]
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "big-endian":
        return x.astype(x.dtype.newbyteorder(">"))
    if how == "every-2nd-col":
        wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "every-3rd-row":
        tall = np.zeros((*x.shape[:-2], 3 * x.shape[-2], x.shape[-1]), x.dtype)
        tall[..., ::3, :] = x
        return tall[..., ::3, :]
    if how == "padded-rows":  # rows of a wider buffer: row stride > row length
        wide = np.zeros((*x.shape[:-1], x.shape[-1] + 5), x.dtype)
        wide[..., :-5] = x
        return wide[..., :-5]
    raise AssertionError(how)


LAYOUTS = [
    "contiguous",
    "bshd",
    "reversed-rows",
    "reversed-cols",
    "reversed-batch",
    "fortran",
    "big-endian",
    "every-2nd-col",
    "every-3rd-row",
    "padded-rows",
]


def inputs(rng, dtype=np.float32):
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("how", LAYOUTS)
@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_layouts(isa, rng, which, how):
    q, k, v = inputs(rng)
    expected = sdpa.scaled_dot_product_attention(q, k, v)
    q, k, v = (layout(x, how) if which in (name, "all") else x for name, x in zip("qkv", (q, k, v)))
    assert how == "contiguous" or any(
        not x.flags.c_contiguous or not x.dtype.isnative for x in (q, k, v)
    )
    out = check(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", ["bshd", "reversed-rows", "fortran", "big-endian", "every-2nd-col"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_layouts_other_dtypes(isa, rng, dtype, how):
    q, k, v = inputs(rng, dtype)
    check(layout(q, how), layout(k, how), layout(v, how))


def test_layouts_with_causal_and_gqa(isa, rng):
    q = layout(rng.standard_normal((B, 6, L, E), dtype=np.float32), "bshd")
    k = layout(rng.standard_normal((B, 2, S, E), dtype=np.float32), "reversed-rows")
    v = layout(rng.standard_normal((B, 2, S, Ev), dtype=np.float32), "every-2nd-col")
    check(q, k, v, is_causal=True, enable_gqa=True)


def test_zero_strides_from_broadcast_to(isa, rng):
    q = np.broadcast_to(rng.standard_normal((1, 1, L, E), dtype=np.float32), (B, H, L, E))
    k = np.broadcast_to(rng.standard_normal((S, E), dtype=np.float32), (B, H, S, E))
    v = np.broadcast_to(rng.standard_normal((1, H, S, 1), dtype=np.float32), (B, H, S, Ev))
    out = check(q, k, v)
    np.testing.assert_array_equal(out[0], out[1])


def test_transposed_key_from_a_kt_buffer(isa, rng):
    # k stored as (B, H, E, S), viewed (B, H, S, E): innermost dim not contiguous
    q, _, v = inputs(rng)
    kt = rng.standard_normal((B, H, E, S), dtype=np.float32)
    check(q, kt.swapaxes(-1, -2), v)


@pytest.mark.parametrize(
    "how", ["transposed", "reversed", "every-2nd-col", "fortran", "big-endian"]
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_strided_masks(isa, rng, kind, how):
    q, k, v = inputs(rng)
    if kind == "bool":
        mask = rng.random((H, L, S)) < 0.6
    else:
        mask = rng.standard_normal((H, L, S))
        mask[rng.random((H, L, S)) < 0.2] = -np.inf
    if how == "transposed":
        mask = np.ascontiguousarray(mask.swapaxes(-1, -2)).swapaxes(-1, -2)
    elif how == "reversed":
        mask = np.ascontiguousarray(mask[:, ::-1, ::-1])[:, ::-1, ::-1]
    elif how == "every-2nd-col":
        wide = np.zeros((H, L, 2 * S), mask.dtype)
        wide[..., ::2] = mask
        mask = wide[..., ::2]
    elif how == "fortran":
        mask = np.asfortranarray(mask)
    elif how == "big-endian":
        mask = mask.astype(mask.dtype.newbyteorder(">"))
    check(q, k, v, mask)


@pytest.mark.parametrize("how", ["bshd", "reversed-rows", "every-2nd-col", "fortran"])
def test_strided_out(isa, rng, how):
    q, k, v = inputs(rng)
    out = layout(np.zeros((B, H, L, Ev), np.float32), how)
    result = sdpa.scaled_dot_product_attention(q, k, v, out=out)
    assert result is out
    np.testing.assert_allclose(
        out, sdpa.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6
    )


def test_out_view_does_not_touch_neighbours(isa, rng):
    q, k, v = inputs(rng)
    buffer = np.full((B, H, L, 2 * Ev), 7.0, np.float32)
    sdpa.scaled_dot_product_attention(q, k, v, out=buffer[..., ::2])
    assert np.all(buffer[..., 1::2] == 7.0)
    np.testing.assert_allclose(
        buffer[..., ::2], sdpa.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6
    )


def test_unaligned_inputs(isa, rng):
    # float32 data starting one byte into a buffer: misaligned for the element type
    def unaligned(x):
        raw = np.zeros(x.nbytes + 1, np.uint8)
        view = raw[1:].view(x.dtype).reshape(x.shape)
        view[...] = x
        assert not view.flags.aligned
        return view

    q, k, v = inputs(rng)
    check(
        unaligned(q),
        unaligned(k),
        unaligned(v),
        unaligned(rng.standard_normal((L, S)).astype(np.float32)),
    )


@pytest.mark.parametrize("how", ["bshd", "reversed-rows", "reversed-batch", "every-3rd-row"])
def test_no_copy_when_the_innermost_dim_is_contiguous(rng, how):
    import tracemalloc

    # 8x the batch, so that a copy of any input stands out
    q, k, v = (layout(np.repeat(x, 8, axis=0), how) for x in inputs(rng))
    out = np.empty((8 * B, H, L, Ev), np.float32)
    sdpa.scaled_dot_product_attention(q, k, v, out=out)  # warm up
    tracemalloc.start()
    try:
        sdpa.scaled_dot_product_attention(q, k, v, out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < min(x.nbytes for x in (q, k, v)) // 2, f"{peak} bytes allocated by NumPy"
