"""float32 accuracy of sdpa against PyTorch's CPU scaled_dot_product_attention (issue 9).

Both are judged against sdpa.reference in float64 on the same float32 inputs; per case, the
median over seeds of the largest absolute error, and in how many seeds sdpa's error exceeded
PyTorch's. Then softcap against FlashAttention's test rule: error <= 2 x the error of a float32
PyTorch reference (scores, tanh and softmax in torch ops) + 1e-5.

    pip install torch==2.13.0 && python benchmarks/accuracy.py [--seeds 10]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import sdpa

# name, (B, H, L, S, E), query multiplier, causal
CASES = [
    ("E=64", (1, 4, 256, 1024, 64), 1.0, False),
    ("E=128", (1, 4, 256, 1024, 128), 1.0, False),
    ("E=256", (1, 4, 256, 1024, 256), 1.0, False),
    ("E=512", (1, 4, 256, 1024, 512), 1.0, False),
    ("x30 logits", (1, 4, 256, 1024, 64), 30.0, False),
    ("S=32768", (1, 2, 64, 32768, 64), 1.0, False),
    ("causal", (1, 4, 512, 512, 128), 1.0, True),
]


def inputs(shape, mul, seed):
    B, H, L, S, E = shape
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, H, L, E)) * mul).astype(np.float32)
    k = rng.standard_normal((B, H, S, E)).astype(np.float32)
    v = rng.standard_normal((B, H, S, E)).astype(np.float32)
    return q, k, v


def errors(q, k, v, **kwargs):
    """(sdpa's, PyTorch's) largest absolute error against the float64 reference."""
    up = [x.astype(np.float64) for x in (q, k, v)]
    ref = sdpa.reference.scaled_dot_product_attention(*up, **kwargs)
    ours = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.no_grad():
        t = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in (q, k, v)), **kwargs
        ).numpy()
    return float(np.abs(ours - ref).max()), float(np.abs(t - ref).max())


def softcap_errors(q, k, v, softcap):
    """(sdpa's, a float32 PyTorch reference's) largest absolute error with softcap."""
    up = [x.astype(np.float64) for x in (q, k, v)]
    ref = sdpa.reference.scaled_dot_product_attention(*up, softcap=softcap)
    ours = sdpa.scaled_dot_product_attention(q, k, v, softcap=softcap)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    s = tq @ tk.transpose(-1, -2) / np.sqrt(q.shape[-1])
    t = (torch.softmax(softcap * torch.tanh(s / softcap), -1) @ tv).numpy()
    return float(np.abs(ours - ref).max()), float(np.abs(t - ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    seeds = range(parser.parse_args().seeds)
    torch.set_num_threads(sdpa.get_num_threads())
    print(f"{'case':<12} {'sdpa':>9} {'torch':>9}  sdpa worse in")
    for name, shape, mul, causal in CASES:
        pairs = [errors(*inputs(shape, mul, s), is_causal=causal) for s in seeds]
        ours, theirs = np.array(pairs).T
        worse = int(np.sum(ours > theirs))
        print(f"{name:<12} {np.median(ours):9.2e} {np.median(theirs):9.2e}  {worse}/{len(seeds)}")
    print(f"{'softcap':<12} {'sdpa':>9} {'torch32':>9}  FlashAttention's rule (2x + 1e-5)")
    for softcap in (50.0, 5.0, 1.0):
        pairs = [softcap_errors(*inputs((2, 4, 128, 200, 64), softcap, s), softcap) for s in seeds]
        ours, theirs = np.array(pairs).T
        held = int(np.sum(ours <= 2 * theirs + 1e-5))
        print(f"{softcap:<12} {np.median(ours):9.2e} {np.median(theirs):9.2e}  {held}/{len(seeds)}")


if __name__ == "__main__":
    main()
