"""Half precision by FlashAttention's accuracy rule, on FlashAttention's test grid.

FlashAttention's tests (tests/test_flash_attn.py) compute three outputs: ``out_ref``, attention
upcast to fp32; ``out_pt``, the same attention in the input's precision by PyTorch with the
scale applied to k (``attention_ref(upcast=False, reorder_ops=True)``); and the kernel's. They
assert ``max|out - out_ref| <= 2 * max|out_pt - out_ref|``. Here out_ref is sdpa.reference in
float64 (stricter than fp32), and out_pt is PyTorch's bf16/fp16 CPU arithmetic emulated in NumPy
(each op computed in float32 and rounded to the input type, as PyTorch's CPU kernels do), so the
rule is judged without PyTorch; test_emulation_matches_pytorch checks the emulation against
PyTorch itself where it is installed."""

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import reference

import sdpa

bf16 = np.dtype(ml_dtypes.bfloat16)
f16 = np.dtype(np.float16)

# test_flash_attn_output's (seqlen_q, seqlen_k) and head dims, and test_flash_attn_causal's decode
# and odd shapes, all run; SDPA_SLOW_TESTS=1 adds (1024, 1024), (1024, 1023) and (2048, 2048)
SEQLENS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1, 239),
           (3, 799), (127, 513), (1023, 1024)]  # fmt: skip
HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
SLOW = os.environ.get("SDPA_SLOW_TESTS") == "1"
if SLOW:
    SEQLENS += [(1024, 1024), (1024, 1023), (2048, 2048)]


def rounded(x, dtype):
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def pytorch_low_precision(q, k, v, causal, dtype):
    """attention_ref(upcast=False, reorder_ops=True) in `dtype`: q @ (k / sqrt(d)), softmax and
    P @ v, each op in float32 and its result rounded to `dtype`; causal bottom-right."""
    q, k, v = (np.asarray(x).astype(np.float32) for x in (q, k, v))
    ks = rounded(k * np.float32(1 / np.sqrt(q.shape[-1])), dtype)
    s = rounded(q @ ks.swapaxes(-1, -2), dtype)
    L, S = s.shape[-2:]
    if causal:
        s = np.where(np.tri(L, S, S - L, dtype=bool), s, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = rounded(e / e.sum(axis=-1, keepdims=True), dtype)
    p = np.nan_to_num(p)  # (a row with no key: 0, as the reference has it)
    return rounded(p @ v, dtype).astype(np.float64)


def flash_rule(rng, L, S, d, causal, dtype, heads=2):
    q, k, v = (rng.standard_normal((heads, n, d)).astype(dtype) for n in (L, S, S))
    kw = {"is_causal": causal, "alignment": "bottom_right"}
    out = sdpa.scaled_dot_product_attention(q, k, v, **kw).astype(np.float64)
    ref = reference(q, k, v, **kw)
    pt = pytorch_low_precision(q, k, v, causal, dtype)
    return np.abs(out - ref).max(), np.abs(pt - ref).max()


def best_isa_and_fallback():
    from sdpa import _config

    isas = _config.available_isas()
    return sorted({isas[0], "baseline"} & set(isas))


@pytest.fixture(params=best_isa_and_fallback())
def isa2(request):
    """The best variant (VDPBF16PS panels where the CPU has them) and the baseline's conversion."""
    from sdpa import _config

    previous = _config.isa()
    _config.set_isa(request.param)
    yield request.param
    _config.set_isa(previous)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("LS", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [bf16, f16], ids=["bf16", "fp16"])
def test_flash_attention_rule(isa2, rng, dtype, LS, d, causal):
    L, S = LS
    ours, theirs = flash_rule(rng, L, S, d, causal, dtype)
    assert ours <= 2 * theirs, f"error {ours:.3g} > 2 x {theirs:.3g} (PyTorch in {dtype})"


def test_emulation_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.standard_normal((2, n, 64)).astype(bf16) for n in (113, 203, 203))
    t = [torch.from_numpy(x.astype(np.float32)).bfloat16() for x in (q, k, v)]
    s = t[0] @ (t[1] / np.sqrt(64)).transpose(-1, -2)
    theirs = (torch.softmax(s, -1) @ t[2]).float().numpy().astype(np.float64)
    ours = pytorch_low_precision(q, k, v, False, bf16)
    ref = reference(q, k, v)
    # the same arithmetic up to PyTorch's float32 summation order: errors of the same size
    e_ours, e_theirs = np.abs(ours - ref).max(), np.abs(theirs - ref).max()
    assert 0.5 * e_theirs <= e_ours <= 2 * e_theirs


@pytest.mark.parametrize(
    "EEv", [(32, 32), (96, 160), (128, 128)], ids=lambda x: f"E{x[0]}-Ev{x[1]}"
)
@pytest.mark.parametrize("S", [1, 2, 31, 33, 300])
@pytest.mark.parametrize("GL", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (4, 2), (8, 1)],
                         ids=lambda x: f"G{x[0]}-L{x[1]}")  # fmt: skip
def test_flash_attention_rule_decode(isa2, rng, GL, S, EEv):
    """Decode tiles (1-8 query rows of a key/value head) in bf16: on avx512_bf16 both products
    use VDPBF16PS from K and V in place (P rounded); every row count, odd key counts and value
    widths of 32-column steps, by FlashAttention's rule."""
    (G, L), (E, Ev) = GL, EEv
    hkv = 2
    q = rng.standard_normal((1, hkv * G, L, E)).astype(bf16)
    k = rng.standard_normal((1, hkv, S, E)).astype(bf16)
    v = rng.standard_normal((1, hkv, S, Ev)).astype(bf16)
    kw = {"is_causal": True, "alignment": "bottom_right", "enable_gqa": True}
    out = sdpa.scaled_dot_product_attention(q, k, v, **kw).astype(np.float64)
    ref = reference(q, k, v, **kw)
    pt = pytorch_low_precision(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), True, bf16)
    assert np.abs(out - ref).max() <= 2 * np.abs(pt - ref).max()
