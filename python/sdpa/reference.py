"""Plain NumPy reference for ``sdpa``: the judge the tests compare the kernel against.

It materialises the full (..., L, S) score matrix and computes everything in float64, so it is
slow and memory hungry but short enough to check by eye. It never imports the compiled module.

Semantics, in order (see the docstring of ``sdpa.scaled_dot_product_attention``)::

    s = scale * q @ k^T                     scale defaults to 1/sqrt(E) (1.0 when E == 0)
    s = softcap * tanh(s / softcap)         if softcap is given
    s = s + attn_mask                       if attn_mask is floating
    s = s - slope * |j - diag(i)|           if alibi_slopes is given
    s[removed] = -inf                       bool attn_mask, is_causal, window, kv_lengths,
                                            and every key of a padding row (q_lengths)
    out = softmax(s) @ v                    a row with no key left gives weights 0, output 0
                                            (sinks: exp(sink) joins each row's denominator)

with diag(i) = i for alignment "top_left" and i + len_k - len_q for "bottom_right", len_k and
len_q being the sequence's kv_lengths and q_lengths (S and L when not given).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._options import Options, takes_options

__all__ = ["attention_weights", "multi_head_attention", "scaled_dot_product_attention"]


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


def _scores(query, key, attn_mask, o: Options):
    """Return the float64 scores (..., L, S), with -inf where a key is removed, and where the
    keys remain (``keep``, broadcast to the scores' shape)."""
    q, k = _f64(query), _f64(key)
    k = _repeat_heads(q, k, o.enable_gqa)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = o.scale if o.scale is not None else (1.0 / np.sqrt(E) if E > 0 else 1.0)
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if o.softcap is not None:
        s = o.softcap * np.tanh(s / o.softcap)

    heads = q.shape[:-2]
    len_k = np.broadcast_to(S if o.kv_lengths is None else o.kv_lengths, heads)
    len_q = np.broadcast_to(L if o.q_lengths is None else o.q_lengths, heads)
    if np.any(len_k < 0) or np.any(len_k > S) or np.any(len_q < 0) or np.any(len_q > L):
        raise ValueError(f"kv_lengths must lie in [0, {S}] and q_lengths in [0, {L}]")
    # diag(i) = i + len_k - len_q for "bottom_right" (FlashAttention's rule for ragged batches)
    offset = (len_k - len_q)[..., None, None] if o.alignment == "bottom_right" else 0
    # positions: query i at q_offset + i, key j at kv_offset + j (a chunk of longer sequences)
    if o.q_offset is not None:
        offset = offset + np.broadcast_to(o.q_offset, heads)[..., None, None]
    if o.kv_offset is not None:
        offset = offset - np.broadcast_to(o.kv_offset, heads)[..., None, None]
    # rel[..., i, j] = j - diag(i): where key j sits relative to query i's diagonal key.
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
            keep = keep & (mask != -np.inf)  # -inf removes the key, even if its score is NaN
    if o.alibi_slopes is not None:
        slopes = np.broadcast_to(_f64(o.alibi_slopes), q.shape[:-2])
        s = s - slopes[..., None, None] * np.abs(rel)
    if o.is_causal:
        keep = keep & (rel <= 0)
    if o.window is not None:
        left, right = o.window
        if left is not None:
            keep = keep & (rel >= -left)
        if right is not None:
            keep = keep & (rel <= right)
    keep = keep & (np.arange(S) < len_k[..., None, None])  # keys that exist
    keep = keep & (np.arange(L)[:, None] < len_q[..., None, None])  # rows that are no padding
    shape = np.broadcast_shapes(s.shape, keep.shape)
    keep = np.broadcast_to(keep, shape)
    return np.where(keep, s, -np.inf), keep


def _apply(weights, keep, v):
    """weights @ v, where a NaN or Inf in a value row reaches exactly the rows that attend its
    key (in a plain product, a weight of 0 would spread it to every row as 0 * NaN)."""
    bad = ~np.isfinite(v)
    out = weights @ np.where(bad, 0.0, v)
    if not bad.any():
        return out
    js = np.nonzero(bad.any(axis=-1).reshape(-1, v.shape[-2]).any(axis=0))[0]  # those keys
    attended = keep[..., js][..., None]  # (..., L, nb, 1)
    w = weights[..., js][..., None]
    vb = np.where(bad, v, 0.0)[..., js, :][..., None, :, :]  # (..., 1, nb, Ev)
    return out + np.where(attended, w * vb, 0.0).sum(axis=-2)


def _softmax(s, sinks=None):
    """Softmax over the last axis and its log-sum-exp; a row of all -inf gives 0 and -inf.

    `sinks` (broadcastable to s.shape[:-2]) adds exp(sink) to each row's denominator: a key
    column of logit `sink` with no value, dropped after the softmax (so the lse includes it)."""
    sink = None if sinks is None else np.broadcast_to(_f64(sinks), s.shape[:-2])[..., None, None]
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    if sink is not None:
        m = np.maximum(m, sink)
    m = np.where(np.isfinite(m), m, 0.0)  # rows with no key: avoid (-inf) - (-inf)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink - m)
    has_key = total != 0  # (a NaN total is not "no key": NaN inputs give NaN out and lse)
    weights = e / np.where(has_key, total, 1.0)
    lse = np.where(has_key, m + np.log(np.where(has_key, total, 1.0)), -np.inf)
    return weights, lse[..., 0]


@takes_options(exclude=("out", "return_lse"))
def attention_weights(query, key, *, attn_mask=None, **options: Any):
    """Attention probabilities (..., L, S) in ``np.result_type(query, key)``.

    Parameters
    ----------
    {options}
    """
    o = Options.parse(options, exclude=("out", "return_lse"), where="attention_weights")
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN and Inf inputs are allowed)
        weights, _ = _softmax(_scores(query, key, attn_mask, o)[0], o.sinks)
    return weights.astype(np.result_type(query, key))


@takes_options()
def scaled_dot_product_attention(query, key, value, attn_mask=None, **options: Any):
    """Attention output (..., L, Ev) in ``np.result_type(query, key, value)``, and with
    ``return_lse`` also the log-sum-exp of the remaining scores (..., L) (float64 for float64
    inputs, float32 otherwise).

    Parameters
    ----------
    {options}
    """
    o = Options.parse(options, where="scaled_dot_product_attention")
    dtype = np.result_type(query, key, value)
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN and Inf inputs are allowed)
        s, keep = _scores(query, key, attn_mask, o)
        weights, lse = _softmax(s, o.sinks)
        if o.q_lengths is not None:  # padding rows: output 0 and lse -inf, a sink or not
            padding = np.arange(s.shape[-2]) >= np.asarray(o.q_lengths)[..., None]
            lse = np.where(padding, -np.inf, lse)
        v = _repeat_heads(np.asarray(query), _f64(value), o.enable_gqa)
        result = _apply(weights, keep, v).astype(dtype)
    if o.out is not None:
        o.out[...] = result
        result = o.out
    if o.return_lse:
        return result, lse.astype(np.float64 if dtype == np.float64 else np.float32)
    return result


def multi_head_attention(
    query,
    key=None,
    value=None,
    *,
    w_q,
    w_k,
    w_v,
    w_o,
    b_q=None,
    b_k=None,
    b_v=None,
    b_o=None,
    num_heads,
    num_kv_heads=None,
    attn_mask=None,
    **options: Any,
):
    """The attention layer written plainly, in float64: the judge of ``sdpa.MultiheadAttention``.

    ``x @ w + b`` projections (self-attention when key and value are None), heads split by
    reshaping the last dim into (heads, head_dim), :func:`scaled_dot_product_attention` (with
    grouped-query heads when num_kv_heads < num_heads and every other option passed on), heads
    merged back, then the output projection. Returns ``(..., T, embed_dim)``."""

    def linear(x, w, b):
        y = _f64(x) @ _f64(w)
        return y if b is None else y + _f64(b)

    def split(x, heads):
        return np.moveaxis(x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads)), -2, -3)

    x = _f64(query)
    kx = x if key is None else key
    vx = x if value is None else value
    hkv = num_heads if num_kv_heads is None else num_kv_heads
    q = split(linear(x, w_q, b_q), num_heads)
    k = split(linear(kx, w_k, b_k), hkv)
    v = split(linear(vx, w_v, b_v), hkv)
    out = scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa=hkv != num_heads, **options)
    merged = np.moveaxis(out, -3, -2)
    return linear(merged.reshape(merged.shape[:-2] + (-1,)), w_o, b_o)
