"""The seed example: three tokens with 3-dim embeddings and seeded projections."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import check, tolerance

import sdpa

X = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float64)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16], ids=["float64", "float32", "float16"]
)
def test_seed_example(isa, dtype):
    rng = np.random.default_rng(0)
    w_q, w_k, w_v = (rng.standard_normal((3, 3)) for _ in range(3))
    q, k, v = ((X @ w).astype(dtype) for w in (w_q, w_k, w_v))
    out = check(q, k, v)
    assert out.shape == (3, 3)
    # attention applied to the identity gives the weights: rows are distributions
    weights = sdpa.scaled_dot_product_attention(q, k, np.eye(3, dtype=dtype))
    weights64, out64 = weights.astype(np.float64), out.astype(np.float64)
    tol = tolerance(dtype)
    np.testing.assert_allclose(weights64.sum(axis=1), 1.0, rtol=2 * tol)
    assert np.all(weights64 > 0)
    np.testing.assert_allclose(
        weights64 @ v.astype(np.float64), out64, rtol=0, atol=2 * tol * np.abs(out64).max()
    )


def test_seed_example_by_hand(isa):
    # softmax(Q K^T / sqrt(3)) @ V written out, independent of both the kernel and the reference
    rng = np.random.default_rng(1)
    w_q, w_k, w_v = (rng.standard_normal((3, 3)) for _ in range(3))
    q, k, v = X @ w_q, X @ w_k, X @ w_v
    scores = q @ k.T / np.sqrt(3)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        sdpa.scaled_dot_product_attention(q, k, v), weights @ v, rtol=1e-12, atol=1e-12
    )


def test_demo_command_runs():
    result = subprocess.run(
        [sys.executable, "-m", "sdpa", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(__file__),
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.lower()
    assert "attention weights" in text
    assert "matches sdpa.reference" in text and "yes" in text
    # the printed weights: three rows of three probabilities
    assert text.count("[") >= 4


def png_size(path):
    """(width, height) of a PNG file, from its signature and IHDR chunk (the first one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR", "no IHDR chunk first"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_demo_plot_draws_the_weights(tmp_path):
    pytest.importorskip("matplotlib")
    from sdpa._demo import PLOT_SIZE

    path = tmp_path / "weights.png"
    result = subprocess.run(
        [sys.executable, "-m", "sdpa", "demo", "--plot", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"attention weights drawn to {path}" in result.stdout
    assert png_size(path) == PLOT_SIZE
    assert path.stat().st_size > 10_000  # a drawn heatmap with text, not an empty canvas


def test_demo_plot_without_matplotlib_names_the_extra(tmp_path):
    path = tmp_path / "weights.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None; from sdpa.__main__ import main; "
        f"sys.exit(main(['demo', '--plot', {str(path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert 'pip install "sdpa[plot]"' in result.stderr
    assert "matches sdpa.reference" not in result.stdout  # it stops before the demo runs
    assert not path.exists()
