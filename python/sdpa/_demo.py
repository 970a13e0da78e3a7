"""`python -m sdpa demo`: self-attention over three tokens, step by step."""

from __future__ import annotations

import numpy as np

from . import reference
from .api import attention_weights, scaled_dot_product_attention


def main() -> int:
    words = ["The", "cat", "sat"]
    # One 3-dim embedding per word.
    x = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float64)
    rng = np.random.default_rng(0)
    w_q, w_k, w_v = (rng.standard_normal((3, 3)) for _ in range(3))
    q, k, v = x @ w_q, x @ w_k, x @ w_v

    out = scaled_dot_product_attention(q, k, v)
    weights = attention_weights(q, k)  # softmax(q k^T / sqrt(d)), row i: token i's attention

    ref_out = reference.scaled_dot_product_attention(q, k, v)
    ref_weights = reference.attention_weights(q, k)

    np.set_printoptions(precision=4, suppress=True)
    print(f"tokens: {' '.join(words)}")
    print("embeddings X (one row per token):\n", x, sep="")
    for name, a in (("W_q", w_q), ("W_k", w_k), ("W_v", w_v)):
        print(f"{name} (seeded random, rng seed 0):\n{a}")
    print("Q = X @ W_q:\n", q, sep="")
    print("K = X @ W_k:\n", k, sep="")
    print("V = X @ W_v:\n", v, sep="")
    print("attention weights softmax(Q K^T / sqrt(3)) (row i: how much token i attends to each):")
    print(weights)
    print("output = weights @ V:\n", out, sep="")
    ok = np.allclose(out, ref_out, rtol=1e-12, atol=1e-12) and np.allclose(
        weights, ref_weights, rtol=1e-12, atol=1e-12
    )
    err = max(np.abs(out - ref_out).max(), np.abs(weights - ref_weights).max())
    print(
        f"matches sdpa.reference (float64): {'yes' if ok else 'NO'} (max abs difference {err:.2e})"
    )
    return 0 if ok else 1
