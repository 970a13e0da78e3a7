"""Hypothesis: random shapes, broadcasts, masks, strides, causal and GQA against the reference."""

import numpy as np
from conftest import check, reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The isa fixture does not change between examples, so sharing it is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

dims = st.integers(1, 4)


def restride(x, how):
    """Same values as ``x`` in another memory layout (how: 0..4)."""
    if x.ndim < 2:
        return x
    if how == 1:  # negative stride along rows
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if how == 2:  # non-contiguous innermost dim
        wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == 3 and x.ndim >= 3:  # heads and rows swapped in memory
        return np.ascontiguousarray(x.swapaxes(-3, -2)).swapaxes(-3, -2)
    if how == 4:
        return np.asfortranarray(x)
    return x


@st.composite
def problems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    L = draw(st.integers(0, 70))
    S = draw(st.integers(0, 300))
    E = draw(st.integers(1, 24))
    Ev = draw(st.integers(1, 24))
    batch = tuple(draw(st.lists(dims, max_size=2)))
    gqa = draw(st.booleans())
    if gqa:
        hkv = draw(dims)
        q_batch = (*batch, hkv * draw(dims))
        kv_batch = (*batch, hkv)
    else:
        # query and key/value set some dims to 1, key/value may drop leading dims: broadcasting
        q_batch = tuple(1 if draw(st.booleans()) else b for b in batch)
        kv_batch = tuple(1 if draw(st.booleans()) else b for b in batch)
        kv_batch = kv_batch[draw(st.integers(0, len(kv_batch))) :]
    out_batch = q_batch if gqa else np.broadcast_shapes(q_batch, kv_batch)

    q = rng.standard_normal((*q_batch, L, E)).astype(dtype)
    k = rng.standard_normal((*kv_batch, S, E)).astype(dtype)
    v = rng.standard_normal((*kv_batch, S, Ev)).astype(dtype)
    q, k, v = (restride(x, draw(st.integers(0, 4))) for x in (q, k, v))

    mask = None
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    if kind != "none":
        full = (*out_batch, L, S)
        shape = tuple(1 if draw(st.booleans()) else n for n in full)
        shape = shape[draw(st.integers(0, len(shape) - 1)) :]
        if kind == "bool":
            mask = rng.random(shape) < draw(st.floats(0.0, 1.0))
        else:
            mask = rng.standard_normal(shape).astype(draw(st.sampled_from([np.float32, dtype])))
            mask[rng.random(shape) < draw(st.floats(0.0, 0.5))] = -np.inf
        mask = restride(mask, draw(st.integers(0, 4)))
    kwargs = {"is_causal": draw(st.booleans()), "enable_gqa": gqa}
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(-2.0, 2.0, allow_nan=False))
    return q, k, v, mask, kwargs


@fixture_ok
@given(problem=problems())
def test_random_problems_match_reference(isa, problem):
    q, k, v, mask, kwargs = problem
    out = check(q, k, v, mask, **kwargs)
    # rows left with no key (reference lse = -inf) are exactly zero, not merely close
    _, lse = reference(q, k, v, mask, return_lse=True, **kwargs)
    empty = np.broadcast_to((lse == -np.inf)[..., None], out.shape)
    assert np.all(out[empty] == 0)
