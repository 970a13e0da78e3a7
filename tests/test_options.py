"""The options record and path selection by capability.

Every option in sdpa.Options is set, one at a time, on calls shaped for each inner path of the
kernel (panels, few rows, general) and for the binding's direct route, and judged against the
reference: a path that ignored an option would fail here. The table of option values must cover
every field of the record, so an option added without a case here fails the suite."""

import dataclasses
import inspect

import numpy as np
import pytest
from conftest import assert_lse_matches, assert_matches_reference, reference

import sdpa
from sdpa import _core, _options
from sdpa.api import _inner_path

# (B, Hq, Hkv, L, S, dtype) for each kernel path: the plain call's path is checked below, so these
# shapes keep exercising what they are named after.
PATH_SHAPES = {
    "panels": (2, 4, 2, 40, 300, np.float32),
    "few_rows": (2, 4, 2, 2, 1500, np.float32),  # 4 query heads of 2 rows share a kv head: 8 rows
    "general": (2, 4, 2, 40, 300, np.float64),
}


def option_values(L, S):
    """A value for every option that changes the result on shapes (B=2, Hq=4, L, S)."""
    return {
        "is_causal": {"is_causal": True},
        "scale": {"scale": 0.37},
        "enable_gqa": {"enable_gqa": True},
        "out": {"out": True},  # (the test allocates it)
        "alignment": {"alignment": "bottom_right", "is_causal": True},
        "window": {"window": (5, 3)},
        "alibi_slopes": {"alibi_slopes": np.array([0.3, 0.0, 0.7, 0.1])},
        "softcap": {"softcap": 0.5},
        "kv_lengths": {"kv_lengths": np.array([[S // 2], [S - 3]])},
        "q_lengths": {
            "q_lengths": np.array([[max(L - 1, 1)], [L]]),
            "kv_lengths": np.array([[S // 2], [S - 3]]),
            "alignment": "bottom_right",
            "is_causal": True,
            "return_lse": True,
        },
        "sinks": {"sinks": np.array([0.5, -1.0, 2.0, 1.0]), "return_lse": True},
        "q_offset": {"q_offset": np.array([[3], [S]]), "is_causal": True, "window": (40, None)},
        "kv_offset": {"kv_offset": np.array([[2], [0]]), "is_causal": True, "alibi_slopes": 0.1},
        "return_lse": {"return_lse": True},
    }


def test_every_option_has_a_case():
    names = {f.name for f in dataclasses.fields(_options.Options)}
    assert set(option_values(4, 8)) == names


def make(shape, rng):
    B, Hq, Hkv, L, S, dtype = shape
    q = rng.standard_normal((B, Hq, L, 16)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, 16)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, 12)).astype(dtype)
    return q * 2, k, v  # scores of a few units, so that softcap and scale matter


@pytest.mark.parametrize("path", PATH_SHAPES)
def test_the_path_shapes_take_their_path(isa, rng, path):
    q, k, v = make(PATH_SHAPES[path], rng)
    assert _inner_path(q, k, v, enable_gqa=True) == path


@pytest.mark.parametrize("path", PATH_SHAPES)
@pytest.mark.parametrize("name", sorted(option_values(4, 8)))
def test_no_path_ignores_an_option(isa, rng, path, name):
    q, k, v = make(PATH_SHAPES[path], rng)
    kwargs = {"enable_gqa": True, **option_values(q.shape[-2], k.shape[-2])[name]}
    if kwargs.pop("out", None):
        kwargs["out"] = np.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    result = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    kwargs.pop("out", None)
    expected = reference(q, k, v, **kwargs)
    magnitude = lambda: reference(q, k, np.abs(v), **{**kwargs, "return_lse": False})  # noqa: E731
    if kwargs.get("return_lse"):
        assert_lse_matches(result[1], expected[1], q.dtype)
        result, expected = result[0], expected[0]
    assert_matches_reference(result, expected, q.dtype, magnitude)


@pytest.mark.parametrize("name", sorted(option_values(4, 8)))
def test_the_direct_route_takes_only_the_options_it_honours(rng, name):
    q, k, v = (rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(3))
    value = option_values(5, 5)[name][name]
    if name == "out":
        value = np.empty((2, 5, 8), np.float32)
    elif name == "enable_gqa":
        value = True
    taken = _core.attention_direct(q, k, v, {name: value}) is not None
    assert taken == (name in _options.DIRECT)
    # Spelled out: the route the Python layer trusts with DIRECT takes the defaults too.
    if name in _options.DIRECT:
        assert _core.attention_direct(q, k, v, {name: _options.default_of(name)}) is not None


def test_the_direct_route_declines_what_it_cannot_read(rng):
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    for options in ({"is_causal": 1}, {"scale": np.float32(0.5)}, {"scale": np.inf},
                    {"out": [1.0]}, {"nonsense": 1}):  # fmt: skip
        assert _core.attention_direct(q, q, q, options) is None, options


def test_signatures_and_docs_come_from_the_record():
    names = [f.name for f in dataclasses.fields(_options.Options)]
    for fn in (sdpa.scaled_dot_product_attention, sdpa.reference.scaled_dot_product_attention):
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["query", "key", "value", "attn_mask"]
        assert list(params)[4:] == names
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names)
        for n in names:
            assert f"{n} : optional" in fn.__doc__
    params = inspect.signature(sdpa.attention_weights).parameters
    assert "out" not in params and "return_lse" not in params and "window" in params


@pytest.mark.parametrize(
    "fn", [sdpa.scaled_dot_product_attention, sdpa.reference.scaled_dot_product_attention]
)
def test_unknown_options_are_type_errors(fn):
    q = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'is_casual'"):
        fn(q, q, q, is_casual=True)


def test_attention_weights_refuses_out_and_return_lse():
    q = np.ones((2, 3), np.float32)
    for kwargs in ({"out": np.empty((2, 2), np.float32)}, {"return_lse": True}):
        with pytest.raises(TypeError, match="attention_weights"):
            sdpa.attention_weights(q, q, **kwargs)


def test_the_record_is_frozen():
    record = _options.Options.parse({"is_causal": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.is_causal = False  # type: ignore[misc]


def test_the_direct_route_takes_other_options_at_their_defaults(rng):
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    plain = {n: _options.default_of(n) for n in _options._NAMES if n not in _options.DIRECT}
    assert _core.attention_direct(q, q, q, {**plain, "is_causal": True}) is not None
    for name, value in (("alignment", "bottom_right"), ("window", (1, 1)), ("return_lse", True),
                        ("enable_gqa", 0)):  # fmt: skip
        assert _core.attention_direct(q, q, q, {**plain, name: value}) is None, (name, value)


@pytest.mark.parametrize(
    "heads", [(8, 2), (6, 6), (4, 1), (1, 1)], ids=lambda h: f"{h[0]}over{h[1]}"
)
def test_the_direct_route_groups_query_heads(isa, rng, heads):
    hq, hkv = heads
    q = rng.standard_normal((3, hq, 1, 32)).astype(np.float32)  # a decode step
    k = rng.standard_normal((3, hkv, 50, 32)).astype(np.float32)
    v = rng.standard_normal((3, hkv, 50, 16)).astype(np.float32)
    out = np.empty((3, hq, 1, 16), np.float32)
    direct = _core.attention_direct(q, k, v, {"enable_gqa": True, "out": out, "is_causal": True})
    assert direct is out
    general = sdpa.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, is_causal=True, kv_lengths=50
    )
    np.testing.assert_array_equal(direct, general)
    want = reference(q, k, v, enable_gqa=True, is_causal=True)
    assert_matches_reference(direct, want, np.float32)
    assert _core.attention_direct(q[:, :, :, :31], k, v, {"enable_gqa": True}) is None  # E differs
