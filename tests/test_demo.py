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
