"""The seed grown up: a 2-layer transformer encoder in NumPy over a padded batch.

Each layer is self-attention (sdpa.MultiheadAttention) and a feed-forward block, with residuals
and layer norms. Sentences of different lengths share a batch: the padding keys are removed with
kv_lengths, so the padded rows never change a real token's output. Each layer's attention is
checked against sdpa.reference.multi_head_attention, a plain float64 NumPy layer.

    python examples/encoder.py
"""

import numpy as np

import sdpa

rng = np.random.default_rng(0)
vocab, d_model, heads, d_ff, layers = 50, 64, 4, 128, 2

sentences = [[3, 14, 15, 9, 26], [5, 35], [8, 9, 7, 9, 3, 2, 38]]  # token ids, one list each
lengths = np.array([len(s) for s in sentences])
T = int(lengths.max())
ids = np.zeros((len(sentences), T), np.int64)
for b, s in enumerate(sentences):
    ids[b, : len(s)] = s  # padded with token 0

embedding = rng.standard_normal((vocab, d_model)).astype(np.float32)
positions = rng.standard_normal((T, d_model)).astype(np.float32) * 0.1
attention = [sdpa.MultiheadAttention(d_model, heads, rng=rng) for _ in range(layers)]
ffn = [
    (
        rng.standard_normal((d_model, d_ff)).astype(np.float32) / 8,
        rng.standard_normal((d_ff, d_model)).astype(np.float32) / 11,
    )
    for _ in range(layers)
]


def layer_norm(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


x = embedding[ids] + positions
kv_lengths = lengths[:, None]  # (batch, 1): broadcast over the heads
worst = 0.0
for mha, (w1, w2) in zip(attention, ffn):
    a = mha(x, kv_lengths=kv_lengths)
    params = {n: getattr(mha, n) for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}
    want = sdpa.reference.multi_head_attention(x, num_heads=heads, kv_lengths=kv_lengths, **params)
    worst = max(worst, float(np.abs(a - want).max() / np.abs(want).max()))
    x = layer_norm(x + a)
    x = layer_norm(x + np.maximum(x @ w1, 0) @ w2)

# A padded batch must give each sentence what it gets alone.
alone = embedding[np.array(sentences[1])][None] + positions[: lengths[1]]
for mha, (w1, w2) in zip(attention, ffn):
    alone = layer_norm(alone + mha(alone))
    alone = layer_norm(alone + np.maximum(alone @ w1, 0) @ w2)
padding_effect = float(np.abs(x[1, : lengths[1]] - alone[0]).max())

print(f"encoded {len(sentences)} sentences of lengths {lengths.tolist()} -> {x.shape}")
print(f"attention vs the reference layer: max relative difference {worst:.1e}")
print(f"sentence 2 in the padded batch vs alone: max difference {padding_effect:.1e}")
assert worst < 1e-5 and padding_effect < 1e-4
print("ok")
