"""Plain NumPy reference for ``sdpa``: the judge the tests compare the kernel against.

It materialises the full (..., L, S) score matrix and computes everything in float64, so it is
slow and memory hungry but short enough to check by eye. It never imports the compiled module.

Semantics, in order (see the docstring of ``sdpa.scaled_dot_product_attention``)::

    s = scale * q @ k^T                     scale defaults to 1/sqrt(E) (1.0 when E == 0)
    s = softcap * tanh(s / softcap)         if softcap is given
    s = s + attn_mask                       if attn_mask is floating
    s = s - slope * |j - diag(i)|           if alibi_slopes is given
    s[removed] = -inf                       bool attn_mask, is_causal, window, kv_lengths
    out = softmax(s) @ v                    a row with no key left gives weights 0, output 0

with diag(i) = i for alignment "top_left" and i + S - L for "bottom_right".
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_weights", "scaled_dot_product_attention"]


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _repeat_heads(q, kv, enable_gqa):
    """Repeat the key/value heads (dim -3) so query head h reads kv head h // (Hq // Hkv)."""
    if not enable_gqa or q.ndim < 3 or kv.ndim < 3 or q.shape[-3] == kv.shape[-3]:
        return kv
    hq, hkv = q.shape[-3], kv.shape[-3]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"enable_gqa: query heads ({hq}) not a multiple of kv heads ({hkv})")
    return np.repeat(kv, hq // hkv, axis=-3)


def _scores(
    query,
    key,
    attn_mask,
    is_causal,
    scale,
    enable_gqa,
    alignment,
    window,
    alibi_slopes,
    softcap,
    kv_lengths,
):
    """Return the float64 scores (..., L, S), with -inf where a key is removed."""
    q, k = _f64(query), _f64(key)
    k = _repeat_heads(q, k, enable_gqa)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(E) if E > 0 else 1.0
    s = float(scale) * (q @ np.swapaxes(k, -1, -2))
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)

    if alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    offset = S - L if alignment == "bottom_right" else 0
    # rel[i, j] = j - diag(i): where key j sits relative to query i's diagonal key.
    rel = np.arange(S)[None, :] - (np.arange(L)[:, None] + offset)

    keep = np.ones((L, S), dtype=bool)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            keep = keep & mask
        elif mask.dtype.kind in "iuc" or mask.dtype == object:
            raise TypeError(f"attn_mask must be bool or floating, got {mask.dtype}")
        else:
            s = s + mask.astype(np.float64)
    if alibi_slopes is not None:
        slopes = np.broadcast_to(_f64(alibi_slopes), q.shape[:-2])
        s = s - slopes[..., None, None] * np.abs(rel)
    if is_causal:
        keep = keep & (rel <= 0)
    if window is not None:
        left, right = window
        if left is not None:
            keep = keep & (rel >= -left)
        if right is not None:
            keep = keep & (rel <= right)
    if kv_lengths is not None:
        lengths = np.broadcast_to(np.asarray(kv_lengths), q.shape[:-2])
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"kv_lengths must be integer, got {lengths.dtype}")
        if np.any(lengths < 0) or np.any(lengths > S):
            raise ValueError(f"kv_lengths must lie in [0, {S}]")
        keep = keep & (np.arange(S) < lengths[..., None, None])
    return np.where(keep, s, -np.inf)


def _softmax(s):
    """Softmax over the last axis and its log-sum-exp; a row of all -inf gives 0 and -inf."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)  # rows with no key: avoid (-inf) - (-inf)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    has_key = total != 0  # (a NaN total is not "no key": NaN inputs give NaN out and lse)
    weights = e / np.where(has_key, total, 1.0)
    lse = np.where(has_key, m + np.log(np.where(has_key, total, 1.0)), -np.inf)
    return weights, lse[..., 0]


def attention_weights(
    query,
    key,
    attn_mask=None,
    *,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    alignment="top_left",
    window=None,
    alibi_slopes=None,
    softcap=None,
    kv_lengths=None,
):
    """Attention probabilities (..., L, S) in ``np.result_type(query, key)``."""
    s = _scores(
        query,
        key,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        alignment,
        window,
        alibi_slopes,
        softcap,
        kv_lengths,
    )
    weights, _ = _softmax(s)
    return weights.astype(np.result_type(query, key))


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    *,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    out=None,
    alignment="top_left",
    window=None,
    alibi_slopes=None,
    softcap=None,
    kv_lengths=None,
    return_lse=False,
):
    """Attention output (..., L, Ev) in ``np.result_type(query, key, value)``, and with
    ``return_lse`` also the log-sum-exp of the remaining scores (..., L) (float64 for float64
    inputs, float32 otherwise)."""
    dtype = np.result_type(query, key, value)
    s = _scores(
        query,
        key,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        alignment,
        window,
        alibi_slopes,
        softcap,
        kv_lengths,
    )
    weights, lse = _softmax(s)
    v = _repeat_heads(np.asarray(query), _f64(value), enable_gqa)
    result = (weights @ v).astype(dtype)
    if out is not None:
        out[...] = result
        result = out
    if return_lse:
        return result, lse.astype(np.float64 if dtype == np.float64 else np.float32)
    return result
