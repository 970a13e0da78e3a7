"""Exact merging of attention computed over disjoint chunks of the keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["merge_attention"]


def merge_attention(
    outs: Sequence[Any], lses: Sequence[Any], *, sinks: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge attention computed over disjoint chunks of the keys into attention over them all.

    Each ``(out_c, lse_c)`` is what ``scaled_dot_product_attention(..., return_lse=True)`` returns
    for one chunk of the keys (with the same queries and options). With ``m = max_c lse_c``::

        w_c = exp(lse_c - m);   out = sum_c w_c out_c / sum_c w_c;   lse = m + log(sum_c w_c)

    which is exactly the attention over all the keys. A row with no key in any chunk (every
    ``lse_c`` is -inf) gives 0 and lse -inf, as a single call would.

    Parameters
    ----------
    outs : sequence of array_like, each of shape (..., L, Ev)
    lses : sequence of array_like, each of shape (..., L)
        One per chunk, in any order. Shapes broadcast.
    sinks : array_like, optional, broadcastable to the lse shape without L (one per head)
        Attention sinks to apply once, to the merged result: compute the chunks *without*
        ``sinks`` and pass them here (each chunk's lse would otherwise count the sink again).

    Returns
    -------
    out : ndarray, in ``np.result_type(*outs)``
    lse : ndarray, in ``np.result_type(*lses)`` (float32 for float32 chunks)
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"need one lse per out, and at least one: got {len(outs)} outs, {len(lses)} lses"
        )
    outs = [np.asarray(o) for o in outs]
    lses = [np.asarray(x) for x in lses]
    for i, (o, x) in enumerate(zip(outs, lses)):
        if o.ndim < 1 or o.shape[:-1] != x.shape:
            raise ValueError(
                f"lses[{i}] of shape {x.shape} must be outs[{i}].shape[:-1] = {o.shape[:-1]}"
            )
    out_dtype = np.result_type(*outs)
    lse_dtype = np.result_type(*lses)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lse = np.stack(np.broadcast_arrays(*[x.astype(np.float64) for x in lses]))
        m = lse.max(axis=0)
        if sinks is not None:
            sink = _sinks(sinks, m.shape)
            m = np.maximum(m, sink)
        m_safe = np.where(np.isfinite(m), m, 0.0)  # (no key anywhere: -inf; a +inf lse stays)
        w = np.exp(lse - m_safe)  # 0 for a chunk where the row has no key
        total = w.sum(axis=0) + (np.exp(sink - m_safe) if sinks is not None else 0.0)
        # (a chunk where the row has no key adds nothing, even 0 * NaN; a NaN weight adds NaN)
        acc = sum(np.where(wc[..., None] != 0, wc[..., None] * o, 0.0) for wc, o in zip(w, outs))
        has_key = total != 0
        out = np.where(has_key[..., None], acc / np.where(has_key, total, 1.0)[..., None], 0.0)
        merged = np.where(has_key, m_safe + np.log(np.where(has_key, total, 1.0)), -np.inf)
        merged = np.where(m == np.inf, np.inf, merged)
    return out.astype(out_dtype), merged.astype(lse_dtype)


def _sinks(sinks: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The sinks, one per row of the lse (``(..., L)``), given per head (``lse.shape[:-1]``)."""
    a = np.asarray(sinks, np.float64)
    try:
        a = np.broadcast_to(a[..., None], shape)
    except ValueError:
        raise ValueError(
            f"sinks of shape {a.shape} must broadcast to the lse's shape without L, {shape[:-1]}"
        ) from None
    if not np.all(np.isfinite(a)):
        raise ValueError("sinks must be finite")
    return a
