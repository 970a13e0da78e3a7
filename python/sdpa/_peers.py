"""Optional CPU peers for `python -m sdpa bench`: ONNX Runtime's ``Attention`` (opset 23) and
OpenVINO's ``scaled_dot_product_attention``, each built for one shape and called on the same
NumPy arrays as sdpa. Every builder returns None when its package is missing or the row's
dtype is one it does not take, so the bench leaves that column empty."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


def ort_fn(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, threads: int
) -> Callable[[], Any] | None:
    """ONNX Runtime's ONNX-domain Attention (opset 23) on 4D (B, H, L, E) inputs, GQA from the
    head counts. float32 and float16 only (its bfloat16 kernel is not implemented). With L == S
    its causal mask (top-left) is the suite's."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
    if q.dtype not in types or not (q.dtype == k.dtype == v.dtype):
        return None
    t = types[q.dtype]
    inputs = [helper.make_tensor_value_info(n, t, None) for n in ("Q", "K", "V")]
    node = helper.make_node(
        "Attention", ["Q", "K", "V"], ["Y"], is_causal=int(causal), scale=1 / math.sqrt(q.shape[-1])
    )
    graph = helper.make_graph([node], "attn", inputs, [helper.make_tensor_value_info("Y", t, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"Q": q, "K": k, "V": v}
    return lambda: sess.run(None, feeds)


def openvino_fn(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, threads: int, hint: str
) -> Callable[[], Any] | None:
    """OpenVINO's scaled_dot_product_attention (opset 13) on float32 inputs with the inference
    precision `hint` ("f32" or "bf16": the CPU plugin then computes in bf16 inside). GQA as 5D
    (B, Hkv, G, L, E) against (B, Hkv, 1, S, E), the layout it validates; static shapes."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    B, Hq, L, E = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qa = np.ascontiguousarray(q, np.float32).reshape(B, Hkv, G, L, E)
    ka = np.ascontiguousarray(k, np.float32)[:, :, None]
    va = np.ascontiguousarray(v, np.float32)[:, :, None]
    params = [
        ops.parameter(list(a.shape), ov.Type.f32, name=n)
        for n, a in (("q", qa), ("k", ka), ("v", va))
    ]
    model = ov.Model([ops.scaled_dot_product_attention(*params, causal=causal)], params, "sdpa")
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    compiled = ov.Core().compile_model(model, "CPU", config)
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if hint not in got and {"f32": "float32", "bf16": "bfloat16"}[hint] not in got:
        return None  # (the plugin did not take the hint: not the comparison the row states)
    request = compiled.create_infer_request()
    feeds = {"q": qa, "k": ka, "v": va}
    return lambda: request.infer(feeds, share_inputs=True, share_outputs=True)
