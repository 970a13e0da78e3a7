"""sdpa.MultiheadAttention: judged by sdpa.reference.multi_head_attention, and by PyTorch's
nn.MultiheadAttention when torch is installed."""

import numpy as np
import pytest
from conftest import assert_matches_reference

import sdpa
from sdpa import reference


def judge(layer, query, key=None, value=None, **kwargs):
    params = {
        n: getattr(layer, n) for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
    }
    return reference.multi_head_attention(
        query, key, value, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        **params, **kwargs,
    )  # fmt: skip


CASES = {
    "self": {},
    "causal": {"is_causal": True},
    "window-alibi": {"is_causal": True, "window": (3, 0), "alibi_slopes": np.linspace(0.1, 0.8, 8)},
    "softcap-sinks": {"softcap": 5.0, "sinks": np.linspace(-1, 1, 8)},
    "padded": {"kv_lengths": np.array([[9], [4]])},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_self_attention_matches_the_reference_layer(rng, case, kv_heads):
    layer = sdpa.MultiheadAttention(64, 8, num_kv_heads=kv_heads, rng=rng)
    x = rng.standard_normal((2, 9, 64)).astype(np.float32)
    kwargs = CASES[case]
    out = layer(x, **kwargs)
    assert out.shape == (2, 9, 64) and out.dtype == np.float32
    assert_matches_reference(out, judge(layer, x, **kwargs), np.float32)


def test_cross_attention_with_its_own_dims_and_a_mask(rng):
    layer = sdpa.MultiheadAttention(32, 4, kdim=24, vdim=40, head_dim=16, rng=rng)
    x = rng.standard_normal((3, 7, 32)).astype(np.float32)
    key = rng.standard_normal((3, 11, 24)).astype(np.float32)
    value = rng.standard_normal((3, 11, 40)).astype(np.float32)
    mask = rng.random((3, 1, 7, 11)) < 0.8
    out, weights = layer(x, key, value, attn_mask=mask, need_weights=True)
    assert out.shape == (3, 7, 32) and weights.shape == (3, 4, 7, 11)
    assert_matches_reference(out, judge(layer, x, key, value, attn_mask=mask), np.float32)
    np.testing.assert_allclose(weights[~np.broadcast_to(mask, weights.shape)], 0)


def test_a_layer_in_float64_and_without_bias(rng):
    layer = sdpa.MultiheadAttention(12, 3, bias=False, dtype=np.float64, rng=rng)
    assert layer.b_q is None and layer.b_o is None
    x = rng.standard_normal((4, 12))  # no batch dims
    np.testing.assert_allclose(
        layer(x, is_causal=True), judge(layer, x, is_causal=True), rtol=1e-12
    )


def test_initialisation_follows_pytorch(rng):
    layer = sdpa.MultiheadAttention(256, 4, rng=rng)
    bound = np.sqrt(6 / (256 + 3 * 256))  # Xavier over the packed (768, 256) in_proj_weight
    for w in (layer.w_q, layer.w_k, layer.w_v):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.abs(layer.w_o).max() <= 1 / 16  # PyTorch's Linear: uniform, 1 / sqrt(fan_in)
    assert all(np.all(b == 0) for b in (layer.b_q, layer.b_k, layer.b_v, layer.b_o))
    again = sdpa.MultiheadAttention(256, 4, rng=np.random.default_rng(7))
    same = sdpa.MultiheadAttention(256, 4, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(again.w_q, same.w_q)


def test_state_dicts_in_both_naming_schemes(rng):
    layer = sdpa.MultiheadAttention(16, 4, num_kv_heads=2, rng=rng)
    hf = {
        "q_proj.weight": layer.w_q.T, "k_proj.weight": layer.w_k.T, "v_proj.weight": layer.w_v.T,
        "o_proj.weight": layer.w_o.T, "q_proj.bias": layer.b_q, "k_proj.bias": layer.b_k,
        "v_proj.bias": layer.b_v, "out_proj.bias": layer.b_o,
    }  # fmt: skip
    other = sdpa.MultiheadAttention(16, 4, num_kv_heads=2, rng=1)
    other.load_state_dict(hf)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(other(x), layer(x))
    third = sdpa.MultiheadAttention(16, 4, num_kv_heads=2, rng=2)
    third.load_state_dict(layer.state_dict())  # PyTorch's names: q/k/v_proj_weight (GQA)
    np.testing.assert_array_equal(third(x), layer(x))
    mha = sdpa.MultiheadAttention(16, 4, rng=rng)
    assert set(mha.state_dict()) == {
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    }
    assert mha.state_dict()["in_proj_weight"].shape == (48, 16)


def test_bad_state_dicts_and_inputs(rng):
    layer = sdpa.MultiheadAttention(16, 4, rng=rng)
    state = layer.state_dict()
    with pytest.raises(ValueError, match="unknown parameter names: bogus"):
        layer.load_state_dict({**state, "bogus": np.zeros(1)})
    with pytest.raises(ValueError, match=r"w_o must have shape \(16, 16\)"):
        layer.load_state_dict({**state, "out_proj.weight": np.zeros((8, 16))})
    with pytest.raises(ValueError, match="lacks b_o"):
        layer.load_state_dict({k: v for k, v in state.items() if k != "out_proj.bias"})
    with pytest.raises(ValueError, match="embed_dim=16"):
        layer(np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError, match="both key and value"):
        layer(np.zeros((3, 16), np.float32), np.zeros((3, 16), np.float32))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        sdpa.MultiheadAttention(16, 4, num_kv_heads=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'return_lse'"):
        layer(np.zeros((3, 16), np.float32), return_lse=True)


def test_decoding_with_a_cache_equals_attention_over_everything(rng):
    layer = sdpa.MultiheadAttention(32, 4, num_kv_heads=2, rng=rng)
    x = rng.standard_normal((2, 12, 32)).astype(np.float32)
    cache = sdpa.KVCache(2, 2, 16, 8)
    steps = [layer(x[:, :5], cache=cache, is_causal=True)]  # a prefill chunk, then one at a time
    steps += [layer(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), layer(x, is_causal=True), rtol=1e-5, atol=1e-6
    )


def test_matches_torch_multihead_attention(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for kdim, vdim in ((None, None), (12, 20)):
        mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=vdim)
        with torch.no_grad():  # biases are 0 at init: give them values to check
            for name, p in mha.named_parameters():
                if "bias" in name:
                    p.normal_()
        layer = sdpa.MultiheadAttention(32, 4, kdim=kdim, vdim=vdim, rng=rng)
        layer.load_state_dict({k: v.detach() for k, v in mha.state_dict().items()})
        x = rng.standard_normal((2, 6, 32)).astype(np.float32)
        kx = rng.standard_normal((2, 9, kdim or 32)).astype(np.float32)
        vx = rng.standard_normal((2, 9, vdim or 32)).astype(np.float32)
        pad = np.zeros((2, 9), bool)
        pad[1, 6:] = True  # torch: True = ignore
        with torch.no_grad():
            args = (torch.from_numpy(a) for a in (x, kx, vx))
            kpm = torch.from_numpy(pad)
            want, want_w = mha(*args, key_padding_mask=kpm, average_attn_weights=False)
        got, got_w = layer(x, kx, vx, attn_mask=~pad[:, None, None, :], need_weights=True)
        np.testing.assert_allclose(
            got, want.numpy(), rtol=1e-5, atol=1e-5 * np.abs(want.numpy()).max()
        )
        np.testing.assert_allclose(got_w, want_w.numpy(), rtol=1e-5, atol=1e-6)
        exported = layer.state_dict()
        for name, value in mha.state_dict().items():
            np.testing.assert_allclose(exported[name], value.numpy(), rtol=1e-6, atol=1e-7)


def test_a_cache_with_padded_queries_holds_only_real_tokens(rng):
    layer = sdpa.MultiheadAttention(8, 2, rng=0, dtype=np.float64)
    cache = sdpa.KVCache(2, 2, 16, 4, dtype=np.float64)
    x = rng.standard_normal((2, 4, 8))
    out = layer(x, cache=cache, is_causal=True, q_lengths=np.array([[2], [4]]))
    assert cache.lengths.tolist() == [2, 4]
    alone = layer(x[:1, :2], is_causal=True)
    np.testing.assert_allclose(out[0, :2], alone[0], rtol=1e-12, atol=1e-12)
    assert np.all(out[0, 2:] == layer.b_o)  # padding rows: zero attention, then the output bias


def test_batch_dims_broadcast_between_query_and_keys(rng):
    layer = sdpa.MultiheadAttention(8, 2, rng=rng)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    kv = rng.standard_normal((2, 5, 8)).astype(np.float32)
    out = layer(x, kv, kv)
    assert out.shape == (2, 3, 8)
    assert_matches_reference(out, judge(layer, x, kv, kv), np.float32)
