"""Packed variable-length batches (FlashAttention's varlen layout), with no padding materialised."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from . import _core
from ._options import PER_HEAD, Options, takes_options
from ._quant import QuantizedKV
from .api import _as_operand, _dtypes, _native, _precision_of, key_operands

__all__ = ["varlen_attention"]

# What a packed call does not take: its layout fixes GQA, the alignment and the lengths, and it
# returns a new array.
_EXCLUDED = ("enable_gqa", "out", "alignment", "kv_lengths", "q_lengths")


@takes_options(exclude=_EXCLUDED)
def varlen_attention(
    query: Any,
    key: Any,
    value: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    **options: Any,
) -> Any:
    """Attention over a batch of sequences of different lengths, packed one after another.

    Sequence b holds query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key/value rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``; it attends only its own keys, with FlashAttention's
    per-sequence bottom-right diagonal: query i of a sequence with len_q queries and len_k keys
    has diagonal ``i + len_k - len_q`` (for ``is_causal``, ``window`` and ``alibi_slopes``).
    Nothing is padded or copied: the work is split over (sequence, head, query tile).

    Parameters
    ----------
    query : array_like, shape (total_q, Hq, E)
    key : array_like or QuantizedKV, shape (total_k, Hkv, E)
    value : array_like or QuantizedKV, shape (total_k, Hkv, Ev)
        Hq must be a multiple of Hkv (grouped-query attention: query head h reads key/value head
        ``h // (Hq // Hkv)``). dtypes, mixed storage and QuantizedKV as in
        :func:`scaled_dot_product_attention`.
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (batch + 1,)
        Cumulative offsets: 0 first, non-decreasing, ``total_q`` / ``total_k`` last.
    max_seqlen_q, max_seqlen_k : int, optional
        Accepted for FlashAttention's signature; checked to be at least the longest sequence.
    {options}

    Here the per-head options (``alibi_slopes``, ``sinks``, ``q_offset``, ``kv_offset``) are
    given per query head ``(Hq,)`` or per sequence and head ``(batch, Hq)``.

    Returns
    -------
    out : ndarray, shape (total_q, Hq, Ev), or ``(out, lse)`` with `return_lse`, lse of shape
    (total_q, Hq) (FlashAttention returns it as (Hq, total_q)).
    """
    opts = Options.parse(options, exclude=_EXCLUDED, where="varlen_attention")
    q, k, v = _packed_operands(query, key, value)
    starts_q, len_q = _offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
    starts_k, len_k = _offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    if len(len_q) != len(len_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got "
            f"{len(len_q)} and {len(len_k)}"
        )
    out, lse = _run_packed(q, k, v, opts, (starts_q, len_q, starts_k, len_k))
    return (out, lse) if opts.return_lse else out


def _run_packed(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, opts: Options, seqs: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Lays the packed arrays out as (sequence, Hkv, G, rows) views and runs the kernel."""
    starts_q, len_q, starts_k, len_k = seqs
    dtype, kv_dtype = _dtypes(q, k, v)
    kernel_dtype = _precision_of(opts, dtype, q)
    hq, hkv = q.shape[1], k.shape[1]
    groups = hq // hkv if hkv else 1
    batch = (len(len_q), hkv, groups)
    L, S = int(len_q.max(initial=0)), int(len_k.max(initial=0))
    out = np.empty(q.shape[:2] + (v.shape[2],), kernel_dtype)
    acc = np.dtype(np.float64 if kernel_dtype == np.float64 else np.float32)
    lse = np.empty(q.shape[:2], acc) if opts.return_lse else None
    if out.size or (lse is not None and lse.size):
        views = {
            "query": _sequences(_native(q, kernel_dtype), batch, L),
            "out": _sequences(out, batch, L),
            "q_starts": _per_sequence(starts_q, batch),
            "kv_starts": _per_sequence(starts_k, batch),
            "q_lengths": _per_sequence(len_q, batch),
            "kv_lengths": _per_sequence(len_k, batch),
            **_per_head_options(opts, batch, hq),
        }
        for name, x in (("key", k), ("value", v)):  # (sequence, Hkv, 1, rows, ...)
            for n, a in key_operands(name, x, kv_dtype).items():
                views[n] = _sequences(a, batch[:2] + (1,), S)
        if lse is not None:
            views["lse"] = _sequences(lse[..., None], batch, L)[..., 0]
        kv_block = k.block if isinstance(k, QuantizedKV) else 0
        record = replace(opts, alignment="bottom_right", enable_gqa=groups > 1)
        _core.attention(views, record, kv_block)
    if kernel_dtype != dtype:
        out = out.astype(dtype)
        lse = None if lse is None else lse.astype(np.float64 if dtype == np.float64 else np.float32)
    return out, lse


def _packed_operands(query: Any, key: Any, value: Any) -> tuple[Any, ...]:
    q, k, v = (_as_operand(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim != 3:
            raise ValueError(f"{name} must have 3 dims (total, heads, features); got {a.shape}")
    if k.shape[2] != q.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"key must be (total_k, Hkv, E) and value (total_k, Hkv, Ev) with query "
            f"(total_q, Hq, E); got query {q.shape}, key {k.shape}, value {v.shape}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if (hq % hkv != 0) if hkv else hq != 0:
        raise ValueError(
            f"query heads (Hq={hq}) must be a multiple of key/value heads (Hkv={hkv}); got query "
            f"{q.shape}, key {k.shape}"
        )
    _dtypes(q, k, v)  # (raises TypeError for dtypes that do not go together)
    return q, k, v


def _offsets(cu: Any, name: str, total: int, max_seqlen: int | None) -> tuple[np.ndarray, ...]:
    """(starts, lengths) of the sequences, from cumulative offsets that are checked."""
    a = np.asarray(cu)
    if a.dtype.kind not in "iu" or a.ndim != 1 or a.size < 1:
        raise TypeError(f"{name} must be a 1-d int32 or int64 array; got {a.dtype} {a.shape}")
    a = a.astype(np.int64)
    lengths = np.diff(a)
    if a[0] != 0 or np.any(lengths < 0) or a[-1] != total:
        raise ValueError(
            f"{name} must start at 0, never decrease and end at {total} (the rows given); got "
            f"{a.tolist() if a.size <= 12 else a}"
        )
    if max_seqlen is not None and max_seqlen < lengths.max(initial=0):
        raise ValueError(
            f"max_seqlen for {name} is {max_seqlen}, below its longest sequence ({lengths.max()})"
        )
    return a[:-1], lengths


def _sequences(a: np.ndarray, batch: tuple[int, int, int], rows: int) -> np.ndarray:
    """A packed (total, H, ...) array as a (sequences, Hkv, G, rows, ...) view whose sequences
    all start at row 0: the kernel adds each one's start (q_starts, kv_starts)."""
    n, hkv, g = batch
    row, head = a.strides[:2]
    shape = (n, hkv, g, rows) + a.shape[2:]
    strides = (0, g * head, head, row) + a.strides[2:]
    return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=a.flags.writeable)


def _per_sequence(values: np.ndarray, batch: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(values.astype(np.int64)[:, None, None], batch)


def _per_head_options(opts: Options, batch: tuple[int, int, int], hq: int) -> dict[str, Any]:
    """The per-head options (alibi_slopes, sinks, q_offset, kv_offset), given per query head
    (Hq,) or per (batch, Hq), laid out by (sequence, Hkv, G) and checked as the functional API
    checks them."""
    arrays = {}
    for name, spec in PER_HEAD.items():
        a = getattr(opts, name)
        if a is None or name in _EXCLUDED:
            continue
        try:
            a = np.broadcast_to(a.astype(spec.dtype), (batch[0], hq))
        except ValueError:
            raise ValueError(
                f"{name} of shape {a.shape} must broadcast to (batch, Hq) = ({batch[0]}, {hq})"
            ) from None
        spec.check(a, 0, 0, name)
        arrays[name] = a.reshape(batch)
    return arrays
