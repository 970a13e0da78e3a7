"""The bench's ONNX Runtime and OpenVINO columns compute the attention their rows state (a
column timing some other work would make its ratio meaningless). Each needs its package."""

import numpy as np
import pytest

import sdpa
from sdpa import _peers

ml_dtypes = pytest.importorskip("ml_dtypes")


def operands(rng, hq, hkv, L, S, E=32, dtype=np.float32):
    q = rng.standard_normal((2, hq, L, E)).astype(dtype)
    k = rng.standard_normal((2, hkv, S, E)).astype(dtype)
    v = rng.standard_normal((2, hkv, S, E)).astype(dtype)
    return q, k, v


def first_output(result):
    if isinstance(result, list):  # ONNX Runtime: the list of outputs
        return np.asarray(result[0])
    return np.asarray(next(iter(result.values())).data)  # OpenVINO: an OVDict of tensors


@pytest.mark.parametrize("hq,hkv,causal", [(4, 4, False), (4, 2, True)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_onnxruntime_column(rng, hq, hkv, causal, dtype):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    q, k, v = operands(rng, hq, hkv, 24, 24, dtype=dtype)
    fn = _peers.ort_fn(q, k, v, causal, 1)
    assert fn is not None
    got = first_output(fn())
    want = sdpa.reference.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert got.shape == want.shape and got.dtype == q.dtype
    tol = 1e-5 if dtype == "float32" else 4e-3
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tol, rtol=tol)
    # bfloat16 is not implemented in its Attention kernel: the column stays empty
    bf = [x.astype(ml_dtypes.bfloat16) for x in (q, k, v)]
    assert _peers.ort_fn(*bf, causal, 1) is None


@pytest.mark.parametrize("hq,hkv,causal", [(4, 4, False), (4, 2, True)])
@pytest.mark.parametrize("hint", ["f32", "bf16"])
def test_openvino_column(rng, hq, hkv, causal, hint):
    pytest.importorskip("openvino")
    q, k, v = operands(rng, hq, hkv, 24, 24)
    fn = _peers.openvino_fn(q, k, v, causal, 1, hint)
    if fn is None:
        assert hint == "bf16"  # (a CPU without bfloat16 support refuses the hint: no column)
        return
    got = first_output(fn()).reshape(q.shape)
    want = sdpa.reference.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    tol = 1e-5 if hint == "f32" else 3e-2  # (bf16 inside: a few bfloat16 steps)
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tol, rtol=tol)
