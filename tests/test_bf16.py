"""bfloat16 (ml_dtypes) in and out on every ISA: plain, masks, causal, GQA, the variants, lse,
attention_weights, out= and strided inputs; mixed dtypes promote by NumPy rules."""

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    assert_matches_reference,
    check,
    check_lse,
    check_weights,
    reference,
    variant_problems,
)
from hypothesis import HealthCheck, given, settings

import sdpa

bf16 = np.dtype(ml_dtypes.bfloat16)
attention = sdpa.scaled_dot_product_attention
B, H, E, Ev = 2, 3, 32, 16


def qkv(rng, L, S, batch=(B, H), kv_heads=None, dtype=bf16):
    kv_batch = batch if kv_heads is None else (*batch[:-1], kv_heads)
    q = rng.standard_normal((*batch, L, E)).astype(dtype)
    k = rng.standard_normal((*kv_batch, S, E)).astype(dtype)
    v = rng.standard_normal((*kv_batch, S, Ev)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "L,S", [(1, 1), (1, 1000), (3, 4096), (65, 257), (130, 300), (300, 64)], ids=str
)
def test_bf16_in_bf16_out(isa, rng, L, S):
    q, k, v = qkv(rng, L, S)
    out = check(q, k, v)
    assert out.dtype == bf16 and out.shape == (B, H, L, Ev)


def test_bf16_output_is_the_reference_rounded_once(isa, rng):
    # the reference rounded to bf16 and the kernel's output agree to within one bf16 rounding;
    # the avx512_bf16 panels (VDPBF16PS) round P to bf16 before P.V, as FlashAttention does,
    # which moves 12% of the outputs one bf16 step further (88% within one rounding; its
    # accuracy contract is FlashAttention's rule, test_flash_grid.py), and their largest error
    # stays within twice that of rounding the exact result once
    q, k, v = qkv(rng, 65, 300)
    out = attention(q, k, v).astype(np.float64)
    exact = reference(q, k, v)
    expected = exact.astype(bf16).astype(np.float64)
    ulp = np.abs(expected) * 2.0**-7 + 1e-30
    # (the sanitizer's "native" build holds them too where the CPU has AVX512_BF16)
    native_bf16 = isa == "native" and sdpa._core.cpu_features().get("avx512bf16", False)
    bf16_panels = isa == "avx512_bf16" or native_bf16
    assert np.mean(np.abs(out - expected) <= ulp) > (0.85 if bf16_panels else 0.95)
    assert np.abs(out - exact).max() <= 2 * np.abs(expected - exact).max()


@pytest.mark.parametrize(
    "dtypes,want",
    [
        ((bf16, np.float32, np.float32), np.float32),
        ((np.float32, bf16, bf16), np.float32),
        ((bf16, bf16, np.float64), np.float64),
    ],
    ids=["bf16-q+f32", "bf16-kv+f32-q", "bf16+f64-v"],
)
def test_mixed_bf16_promotes(isa, rng, dtypes, want):
    q = rng.standard_normal((B, 40, E)).astype(dtypes[0])
    k = rng.standard_normal((B, 300, E)).astype(dtypes[1])
    v = rng.standard_normal((B, 300, Ev)).astype(dtypes[2])
    assert np.result_type(q, k, v) == want
    out = check(q, k, v, is_causal=True)
    assert out.dtype == want


def test_bf16_with_float16_follows_numpy_promotion(isa, rng):
    # Before ml_dtypes 0.7 NumPy had no common type for bfloat16 and float16 (a TypeError here);
    # from 0.7 on they promote to float32, and so does the result.
    q = rng.standard_normal((4, 40, E)).astype(bf16)
    v = rng.standard_normal((4, 40, Ev)).astype(np.float16)
    try:
        want = np.result_type(q, q, v)
    except TypeError:
        with pytest.raises(TypeError, match="no common dtype"):
            attention(q, q, v)
        return
    assert want == np.float32
    assert check(q, q, v).dtype == want


@pytest.mark.parametrize("mask_dtype", ["bool", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_masks_and_causal(isa, rng, mask_dtype, causal):
    q, k, v = qkv(rng, 70, 300)
    if mask_dtype == "bool":
        mask = rng.random((H, 70, 300)) < 0.6
    else:
        mask = rng.standard_normal((H, 70, 300)).astype(mask_dtype)
        mask[rng.random(mask.shape) < 0.2] = -np.inf
    check(q, k, v, mask, is_causal=causal)


def test_bf16_gqa(isa, rng):
    q, k, v = qkv(rng, 33, 300, batch=(B, 6), kv_heads=2)
    assert check(q, k, v, enable_gqa=True, is_causal=True).shape == (B, 6, 33, Ev)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"is_causal": True},
        {"window": (30, 4)},
        {"alibi_slopes": np.array([0.5, 0.25, 0.125])},
        {"softcap": 2.0, "scale": 1.0},
        {"kv_lengths": np.array([[0], [257]])},
    ],
    ids=["causal", "window", "alibi", "softcap", "kv-lengths"],
)
def test_bf16_variants(isa, rng, alignment, kwargs):
    q, k, v = qkv(rng, 70, 300)
    check_lse(q, k, v, alignment=alignment, **kwargs)


@pytest.mark.parametrize("LS", [(70, 333), (333, 70)], ids=["L<S", "L>S"])
def test_bf16_combination(isa, rng, LS):
    q, k, v = qkv(rng, *LS, batch=(B, 4), kv_heads=2)
    check_lse(
        q,
        k,
        v,
        is_causal=True,
        window=(50, 3),
        enable_gqa=True,
        kv_lengths=np.array([[LS[1]], [LS[1] // 2]]),
        alignment="bottom_right",
    )


def test_bf16_decode_split_k(isa, rng):
    q, k, v = qkv(rng, 1, 5000, batch=(B, 8), kv_heads=2)
    check_lse(
        q,
        k,
        v,
        enable_gqa=True,
        alignment="bottom_right",
        window=(3000, 0),
        kv_lengths=np.array([[5000], [1500]]),
    )


def test_bf16_lse(isa, rng):
    q, k, v = qkv(rng, 70, 300)
    out, lse = check_lse(q, k, v)
    assert out.dtype == bf16 and lse.dtype == np.float32 and lse.shape == (B, H, 70)


def test_bf16_rows_with_no_key(isa, rng):
    q, k, v = qkv(rng, 90, 40)
    out, lse = check_lse(q, k, v, is_causal=True, alignment="bottom_right")
    assert np.all(lse[..., :50] == -np.inf)
    assert np.all(out[..., :50, :].astype(np.float32) == 0)


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True, "window": (20, None)}], ids=["plain", "causal-window"]
)
def test_bf16_weights(isa, rng, kwargs):
    q, k, _ = qkv(rng, 65, 257)
    w = check_weights(q, k, **kwargs)
    assert w.dtype == bf16 and w.shape == (B, H, 65, 257)


def test_bf16_weights_mixed_promote(isa, rng):
    q, k, _ = qkv(rng, 20, 70)
    assert check_weights(q, k.astype(np.float32)).dtype == np.float32


def test_bf16_out(isa, rng):
    q, k, v = qkv(rng, 40, 100)
    buf = np.empty((B, H, 40, Ev), bf16)
    out = attention(q, k, v, out=buf, is_causal=True)
    assert out is buf
    assert_matches_reference(buf, reference(q, k, v, is_causal=True), bf16)


def test_bf16_strided_inputs(isa, rng):
    q, k, v = qkv(rng, 40, 300)
    q_t = np.ascontiguousarray(q.swapaxes(-3, -2)).swapaxes(-3, -2)  # heads and rows swapped
    k_r = np.ascontiguousarray(k[..., ::-1, :])[..., ::-1, :]  # negative row stride
    v_w = np.zeros((*v.shape[:-1], 2 * Ev), bf16)
    v_w[..., ::2] = v
    v_s = v_w[..., ::2]  # non-contiguous features
    check(q_t, k_r, v_s, is_causal=True)


def test_bf16_broadcast_batch(isa, rng):
    q = rng.standard_normal((H, 17, E)).astype(bf16)
    k = rng.standard_normal((B, 1, 60, E)).astype(bf16)
    v = rng.standard_normal((B, 1, 60, Ev)).astype(bf16)
    assert check(q, k, v).shape == (B, H, 17, Ev)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(problem=variant_problems(dtypes=[bf16]))
def test_bf16_random_variant_combinations(isa, problem):
    q, k, v, mask, kwargs = problem
    out, _ = check_lse(q, k, v, mask, **kwargs)
    assert out.dtype == bf16
