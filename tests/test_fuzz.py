"""Differential fuzz: random calls with every option, against sdpa.reference.

Each case draws, from its own seed: shapes (empty dims included), leading dims that broadcast,
grouped-query heads, dtypes (mixed ones included), memory layouts (transposed, reversed,
strided, Fortran), a bool or float mask, every option of sdpa.Options, an ``out`` array (strided
too), lse, and now and then the attention weights instead. CI runs the fixed cases below;
``SDPA_FUZZ_CASES=5000 SDPA_FUZZ_SEED=1 python -m pytest tests/test_fuzz.py`` runs many more (a
case is ``seed-index``, reproducible by setting both).
"""

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_lse_matches, assert_matches_reference, reference, reference_weights

import sdpa

CASES = int(os.environ.get("SDPA_FUZZ_CASES", "300"))
SEED = int(os.environ.get("SDPA_FUZZ_SEED", "0"))  # (another seed, other cases)
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def layout(rng, x):
    """The same values as `x` in a random memory layout."""
    how = rng.integers(0, 5)
    if x.ndim < 2 or how == 0:
        return x
    if how == 1:  # rows reversed in memory
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if how == 2:  # a non-contiguous last dim
        wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == 3:
        return np.asfortranarray(x)
    return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)  # column-major rows


def draw_shapes(rng):
    """(q, k, v shapes, enable_gqa) with broadcasting leading dims or grouped heads."""
    L, S = (int(x) for x in rng.choice([0, 1, 2, 5, 9, 17, 48, 70, 130], 2))
    if rng.random() < 0.15:  # decode-like, where the keys are split across work items
        L, S = int(rng.integers(1, 4)), int(rng.integers(1030, 2100))
    E, Ev = (
        int(rng.integers(1, 40)),
        int(rng.integers(0, 24) if rng.random() < 0.1 else rng.integers(1, 24)),
    )
    batch = tuple(int(b) for b in rng.integers(1, 4, rng.integers(0, 3)))
    if rng.random() < 0.4:
        hkv, g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        qb, kb = (*batch, hkv * g), (*batch, hkv)
        return (*qb, L, E), (*kb, S, E), (*kb, S, Ev), True
    qb = tuple(1 if rng.random() < 0.3 else b for b in batch)
    kb = tuple(1 if rng.random() < 0.3 else b for b in batch)[
        int(rng.integers(0, len(batch) + 1)) :
    ]
    return (*qb, L, E), (*kb, S, E), (*kb, S, Ev), False


def draw_options(rng, q_batch, L, S):
    heads = [q_batch, q_batch[-1:] if q_batch else (), ()]
    per_head = lambda: heads[int(rng.integers(0, len(heads)))]  # noqa: E731
    side = lambda: None if rng.random() < 0.3 else int(rng.integers(0, S + L + 50))  # noqa: E731
    options = {
        "is_causal": bool(rng.random() < 0.4),
        "alignment": str(rng.choice(["top_left", "bottom_right"])),
        "return_lse": bool(rng.random() < 0.5),
    }
    if rng.random() < 0.3:
        options["window"] = (side(), side())
    if rng.random() < 0.3:
        options["alibi_slopes"] = rng.uniform(0, 0.5, per_head())
    if rng.random() < 0.3:
        options["softcap"] = float(rng.uniform(0.5, 30))
    if rng.random() < 0.3:
        options["kv_lengths"] = rng.integers(0, S + 1, per_head())
    if rng.random() < 0.3:
        options["sinks"] = rng.normal(0, 2, per_head())
    if rng.random() < 0.3:
        options["scale"] = float(rng.uniform(-1, 1))
    if rng.random() < 0.2:
        options["q_lengths"] = rng.integers(0, L + 1, per_head())
    if rng.random() < 0.2:
        options["q_offset"] = rng.integers(-S, S + 1, per_head())
    if rng.random() < 0.2:
        options["kv_offset"] = rng.integers(-S, S + 1, per_head())
    return options


def draw_mask(rng, batch, L, S):
    if rng.random() < 0.6:
        return None
    shape = [(L, S), (1, S), (L, 1), (*batch, L, S)][int(rng.integers(0, 4))]
    if rng.random() < 0.5:
        return rng.random(shape) < 0.8
    mask = rng.standard_normal(shape).astype(rng.choice([np.float32, np.float64]))
    mask[rng.random(shape) < 0.2] = -np.inf
    return mask


@pytest.mark.parametrize("case", range(CASES), ids=lambda i: f"{SEED}-{i}")
def test_fuzz(case):
    rng = np.random.default_rng([SEED, case])
    q_shape, k_shape, v_shape, gqa = draw_shapes(rng)
    dtype = DTYPES[int(rng.integers(0, 4))]
    mixed = DTYPES[int(rng.integers(2, 4))] if rng.random() < 0.2 else dtype  # float32/64 only
    q = layout(rng, rng.standard_normal(q_shape).astype(dtype))
    k = layout(
        rng, rng.standard_normal(k_shape).astype(mixed if dtype != ml_dtypes.bfloat16 else dtype)
    )
    v = layout(rng, rng.standard_normal(v_shape).astype(dtype))
    L, S = q_shape[-2], k_shape[-2]
    batch = q_shape[:-2] if gqa else np.broadcast_shapes(q_shape[:-2], k_shape[:-2])
    mask = draw_mask(rng, batch, L, S)
    options = {"enable_gqa": gqa, **draw_options(rng, q_shape[:-2], L, S)}
    if rng.random() < 0.15:  # the weights instead of the output
        options.pop("return_lse")
        weights = sdpa.attention_weights(q, k, attn_mask=mask, **options)
        assert_matches_reference(
            weights, reference_weights(q, k, mask, **options), np.result_type(q, k)
        )
        return
    result_dtype = np.result_type(q, k, v)
    if rng.random() < 0.3:
        options["out"] = layout(rng, np.full((*batch, L, v_shape[-1]), np.nan, result_dtype))
    result = sdpa.scaled_dot_product_attention(q, k, v, mask, **options)
    out = options.pop("out", None)
    expected = reference(q, k, v, mask, **options)
    if options["return_lse"]:
        (result, lse), (expected, expected_lse) = result, expected
        assert_lse_matches(lse, expected_lse, result_dtype)
    if out is not None:
        assert result is out

    def magnitude():  # (the reference over |v|: what each output element sums)
        return reference(q, k, abs(v.astype(np.float64)), mask, **{**options, "return_lse": False})

    assert_matches_reference(result, expected, result_dtype, magnitude)
