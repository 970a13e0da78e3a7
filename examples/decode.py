"""Greedy decoding with a KV cache: a one-layer decoder with random weights generates tokens one
at a time, attending over a sdpa.KVCache; every step is checked against recomputing full causal
attention over all the tokens so far (sdpa.reference), and the generated tokens must agree.

    python examples/decode.py
"""

import numpy as np

import sdpa

rng = np.random.default_rng(0)
vocab, d_model, heads, kv_heads, steps = 40, 64, 8, 2, 24  # grouped-query attention: 4 per group

embedding = rng.standard_normal((vocab, d_model)).astype(np.float32)
unembedding = rng.standard_normal((d_model, vocab)).astype(np.float32)
layer = sdpa.MultiheadAttention(d_model, heads, num_kv_heads=kv_heads, rng=rng)
params = {n: getattr(layer, n) for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}
prompt = [1, 7, 3, 12]


cache = sdpa.KVCache(1, kv_heads, 64, layer.head_dim)
tokens = list(prompt)
x = embedding[np.array(tokens)][None]  # (1, T, d_model)
h = layer(x, cache=cache, is_causal=True)  # the prompt, as one chunk
worst = 0.0
for _ in range(steps):
    nxt = int(np.argmax(h[0, -1] @ unembedding))
    # Recompute attention over every token so far, as if there were no cache.
    everything = embedding[np.array(tokens)][None]
    full = sdpa.reference.multi_head_attention(
        everything, num_heads=heads, num_kv_heads=kv_heads, is_causal=True, **params
    )
    worst = max(worst, float(np.abs(h[0, -1] - full[0, -1]).max()))
    assert int(np.argmax(full[0, -1] @ unembedding)) == nxt, "the cache changed a token"
    tokens.append(nxt)
    h = layer(embedding[[nxt]][None], cache=cache)  # one new token: decode

print(f"prompt {prompt} -> generated {tokens[len(prompt) :]}")
print(f"cache holds {int(cache.lengths[0])} tokens; max difference from full recompute {worst:.1e}")
assert worst < 1e-4
print("ok")
