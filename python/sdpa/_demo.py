"""`python -m sdpa demo [--plot FILE.png]`: self-attention over three tokens, step by step."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import reference
from .api import attention_weights, scaled_dot_product_attention

# The heatmap's size in pixels (width, height): its size in inches times PLOT_DPI.
PLOT_SIZE = (640, 480)
PLOT_DPI = 100


def _figure_class() -> Any:
    """matplotlib's Figure (drawn without pyplot, so no GUI backend is involved)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'the demo draws its heatmap with matplotlib, which is missing: pip install "sdpa[plot]"'
        ) from e
    return Figure


def plot_weights(words: list[str], weights: np.ndarray, path: str) -> None:
    """Draw ``weights`` (L x S) as a heatmap, tokens on both axes and each value in its cell."""
    figure = _figure_class()(
        figsize=(PLOT_SIZE[0] / PLOT_DPI, PLOT_SIZE[1] / PLOT_DPI),
        dpi=PLOT_DPI,
        layout="constrained",
    )
    ax = figure.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(words)), labels=words)
    ax.set_yticks(range(len(words)), labels=words)
    ax.set_xlabel("key (the token attended to)")
    ax.set_ylabel("query (the token attending)")
    ax.set_title(r"attention weights softmax$(QK^T/\sqrt{3})$")
    for (i, j), w in np.ndenumerate(weights):
        color = "black" if w > 0.6 else "white"  # readable on viridis' dark and light ends
        ax.text(j, i, f"{w:.3f}", ha="center", va="center", color=color, fontsize=14)
    figure.colorbar(image, ax=ax, label="weight (each row sums to 1)")
    figure.savefig(path, dpi=PLOT_DPI)


def main(plot: str | None = None) -> int:
    """Print the three-token example; with ``plot``, also draw its weights into that PNG file."""
    if plot is not None:
        try:
            _figure_class()
        except ImportError as e:
            print(f"python -m sdpa demo --plot: {e}", file=sys.stderr)
            return 1
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
    if plot is not None:
        plot_weights(words, weights, plot)
        print(f"attention weights drawn to {plot}")
    return 0 if ok else 1
