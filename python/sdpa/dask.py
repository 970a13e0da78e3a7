"""Exact attention over Dask arrays: sharded along batch, heads, queries and keys.

``import sdpa.dask`` (the ``sdpa[dask]`` extra); ``import sdpa`` alone never imports Dask.

How the work is cut (see :func:`scaled_dot_product_attention`): each (batch/head block, query
block, key block) triple that any causal rule, window or ``kv_lengths`` leaves with a key to attend
becomes one kernel call on one query block and one key block, at the positions those blocks hold
in the full sequences (``q_offset``/``kv_offset``), returning a partial ``(out, lse)``. The
partials of a query block are merged exactly (:func:`sdpa.merge_attention`) in a tree of
``split_every``-way merges. The triples that are fully masked are never made into tasks.

Threads: inside a ``distributed`` worker each kernel call runs on as many sdpa threads as the
worker has threads (``distributed.get_worker().state.nthreads``; it sets the worker process's
:func:`sdpa.set_num_threads`), so a cluster of 1-thread workers runs one kernel thread per
worker and never oversubscribes its cores. Under the threaded or synchronous scheduler, in the
caller's own process, the caller's setting stands (sdpa's default: one thread per core); a task
that finds sdpa's pool busy with another task's call runs on its own thread.
"""

from __future__ import annotations

import itertools
import operator
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _varlen
from ._config import get_num_threads, set_num_threads
from ._merge import merge_attention
from ._options import Options, takes_options
from .api import _DTYPES, _name, per_head_arrays
from .api import scaled_dot_product_attention as _attention

__all__ = ["scaled_dot_product_attention", "varlen_attention"]

_WHERE = "sdpa.dask.scaled_dot_product_attention"


# ---- Inside a task: thread count, kernel calls and merges (module-level: workers import them).


def _use_worker_threads() -> None:
    """Inside a ``distributed`` worker, sizes sdpa's pool to the worker's thread count, so a
    worker with n threads runs n kernel threads rather than one per core. Elsewhere (the threaded
    or synchronous scheduler, in the caller's own process) the caller's setting stands."""
    distributed = sys.modules.get("distributed")  # (not imported: not in a worker)
    if distributed is None:
        return
    try:
        worker = distributed.get_worker()
    except ValueError:  # (distributed imported, but this is not a worker's task)
        return
    n = int(worker.state.nthreads)
    if n >= 1 and get_num_threads() != n:
        set_num_threads(n)


@dataclass(frozen=True, eq=False)
class _Call:
    """One kernel call of the graph: its keyword options (positions, local lengths, per-head
    arrays of its block) and, for a block with no key, the shapes to make up."""

    kwargs: dict[str, Any]
    dtype: np.dtype
    shape: tuple[int, ...] = ()  # query block (..., L_c, E) when no key block is used
    ev: int = 0
    upcast: bool = False  # a partial of float16/bfloat16 operands: a float32 query (and result)


def _attend(call: _Call, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any) -> Any:
    """One query block against one key block."""
    _use_worker_threads()
    if call.upcast:  # a float32 query over half K/V: float32 partials, K and V read as they are
        q = q.astype(np.float32)
    return _attention(q, k, v, mask, **call.kwargs)


def _no_keys(call: _Call) -> Any:
    """A query block with no key to attend anywhere: a call over zero keys gives its rows exactly
    what the full call gives them (0; lse -inf, or the sink)."""
    _use_worker_threads()
    q = np.zeros(call.shape, call.dtype)
    k = np.zeros(call.shape[:-2] + (0, call.shape[-1]), call.dtype)
    v = np.zeros(call.shape[:-2] + (0, call.ev), call.dtype)
    return _attention(q, k, v, **call.kwargs)


def _combine(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An inner node of the merge tree (the merge of merges is exact: lse composes)."""
    outs, lses = zip(*parts)
    return merge_attention(outs, lses)


@dataclass(frozen=True, eq=False)
class _Finish:
    """The root of a query block's merge tree: sinks once, the padding rows, the result type."""

    return_lse: bool
    dtype: np.dtype
    sinks: np.ndarray | None = None
    q_lengths: np.ndarray | None = None  # local (rows of this block), only with sinks


def _finish(fin: _Finish, *parts: tuple[np.ndarray, np.ndarray]) -> Any:
    outs, lses = zip(*parts)
    out, lse = merge_attention(outs, lses, sinks=fin.sinks)
    out = out.astype(fin.dtype, copy=False)
    if fin.q_lengths is not None:  # padding rows have lse -inf, sink or not (as in one call)
        rows = np.arange(lse.shape[-1])
        lse = np.where(rows >= fin.q_lengths[..., None], -np.inf, lse).astype(lse.dtype)
    return (out, lse) if fin.return_lse else out


# ---- Checking and aligning the operands.


def _as_dask(x: Any, name: str) -> da.Array:
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray, whose mask sdpa would ignore")
    a = x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=-1)
    if a.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., rows, features); got {a.shape}")
    return a


def _pad(a: da.Array, ndim: int, name: str) -> da.Array:
    """`a` with leading dims of size 1 up to `ndim` (the query's)."""
    if a.ndim > ndim:
        raise ValueError(
            f"{name} has more dims than query ({a.shape}): the result is chunked like the "
            f"query, so its batch shape is the query's"
        )
    return a[(None,) * (ndim - a.ndim)] if a.ndim < ndim else a


def _dtype(q: da.Array, k: da.Array, v: da.Array) -> np.dtype:
    try:
        dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    except TypeError:
        dtype = None
    if dtype is None or _name(dtype) not in _DTYPES:
        raise TypeError(
            f"query, key and value ({q.dtype}, {k.dtype}, {v.dtype}) have no common dtype sdpa "
            f"computes (float16, bfloat16, float32 or float64)"
        )
    return dtype


def _check_features(q: da.Array, k: da.Array, v: da.Array) -> None:
    """E and Ev in one chunk each; key and value cut alike along S."""
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"query (..., L, E), key (..., S, E) and value (..., S, Ev) do not fit: got query "
            f"{q.shape}, key {k.shape}, value {v.shape}"
        )
    _whole_features(q, k, v)
    _keys_alike(k, v, -2, "S")


def _whole_features(q: da.Array, k: da.Array, v: da.Array) -> None:
    for name, a in (("query", q), ("key", k), ("value", v)):
        if len(a.chunks[-1]) != 1:
            raise ValueError(
                f"{name} is split along its last dim (features) into chunks {a.chunks[-1]}; "
                f"each block needs whole feature vectors: rechunk it with "
                f"{name}.rechunk({{-1: -1}})"
            )


def _keys_alike(k: da.Array, v: da.Array, axis: int, what: str) -> None:
    if k.chunks[axis] != v.chunks[axis]:
        raise ValueError(
            f"key and value must be cut alike along {what} (dim {axis}), so that each task holds "
            f"one key block and its values; got key chunks {k.chunks[axis]} and value chunks "
            f"{v.chunks[axis]}: rechunk with value.rechunk({{{axis}: key.chunks[{axis}]}})"
        )


def _kv_head_chunks(q_chunks: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """Key/value head chunks for query head chunks under GQA (query head h reads key/value head
    h // groups): each query chunk must lie within one group or start and end on group
    boundaries, so that it reads one key/value block whose heads it groups evenly."""
    bounds: list[int] = [0]
    start = 0
    for size in q_chunks:
        stop = start + size
        within = size > 0 and start // groups == (stop - 1) // groups
        if not within and (start % groups or stop % groups):
            raise ValueError(
                f"enable_gqa=True with {groups} query heads per key/value head: query head "
                f"chunk [{start}, {stop}) neither lies within one group nor starts and ends on "
                f"group boundaries; rechunk query along dim -3 in multiples of {groups} (e.g. "
                f"query.rechunk({{-3: {groups}}}))"
            )
        end = -(-stop // groups)
        if end > bounds[-1]:
            bounds.append(end)
        start = stop
    return tuple(int(b) for b in np.diff(bounds))


def _kv_head_index(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], groups: int) -> list:
    """For each query head block, the key/value head block that it reads."""
    q_starts = np.cumsum((0,) + q_chunks)[:-1]
    kv_stops = np.cumsum(kv_chunks)
    return [int(np.searchsorted(kv_stops, s // groups, side="right")) for s in q_starts]


def _follow(a: da.Array, q: da.Array, axis: int, name: str) -> tuple[da.Array, list[int]]:
    """`a` cut like the query along batch `axis` (rechunked if need be, as Dask's blockwise does),
    and for each query block the block of `a` it reads (0 where `a` broadcasts, size 1)."""
    n, blocks = a.shape[axis], len(q.chunks[axis])
    if n == 1:
        return a, [0] * blocks
    if n != q.shape[axis]:
        hint = "; for grouped-query attention pass enable_gqa=True" if axis == q.ndim - 3 else ""
        raise ValueError(
            f"{name} dim {axis - q.ndim} has size {n}; it must be the query's ({q.shape[axis]}) "
            f"or 1 (got query {q.shape}, {name} {a.shape}){hint}"
        )
    if a.chunks[axis] != q.chunks[axis]:
        a = a.rechunk({axis: q.chunks[axis]})
    return a, list(range(blocks))


def _gqa_heads(
    q: da.Array, k: da.Array, v: da.Array, axis: int
) -> tuple[da.Array, da.Array, list[int]]:
    """Key and value cut along the heads (`axis`) by the query's head chunks under GQA, and the
    key/value head block each query head block reads."""
    hq, hkv = q.shape[axis], k.shape[axis]
    if v.shape[axis] != hkv or ((hq % hkv != 0) if hkv else hq != 0):
        raise ValueError(
            f"grouped-query attention: query heads (Hq={hq}) must be a multiple of the key/value "
            f"heads (Hkv={hkv}, the same in both); got query {q.shape}, key {k.shape}, value "
            f"{v.shape}"
        )
    if not hkv:
        return k, v, [0] * len(q.chunks[axis])
    groups = hq // hkv
    kv_chunks = _kv_head_chunks(q.chunks[axis], groups)
    k, v = (x if x.chunks[axis] == kv_chunks else x.rechunk({axis: kv_chunks}) for x in (k, v))
    return k, v, _kv_head_index(q.chunks[axis], kv_chunks, groups)


def _align_kv(
    q: da.Array, k: da.Array, v: da.Array, gqa: bool
) -> tuple[da.Array, da.Array, list[list[int]], list[list[int]]]:
    """Key and value cut like the query along the batch dims (the heads by groups under GQA),
    and per batch dim the block of each that every query block reads."""
    k_index, v_index = [], []
    for axis in range(q.ndim - 2):
        if gqa and axis == q.ndim - 3:
            k, v, index = _gqa_heads(q, k, v, axis)
            k_index.append(index)
            v_index.append(index)
            continue
        k, ki = _follow(k, q, axis, "key")
        v, vi = _follow(v, q, axis, "value")
        k_index.append(ki)
        v_index.append(vi)
    return k, v, k_index, v_index


def _as_mask(attn_mask: Any, q: da.Array, k: da.Array) -> da.Array | None:
    """The mask as a Dask array of query.ndim dims, cut like the query (batch, L) and the key (S).
    A NumPy mask is cut so; a Dask mask cut otherwise along L or S is an error."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, np.ma.MaskedArray):
        raise TypeError("attn_mask is a numpy.ma.MaskedArray, whose mask sdpa would ignore")
    mask = attn_mask if isinstance(attn_mask, da.Array) else np.asarray(attn_mask)
    if mask.dtype != np.bool_ and _name(mask.dtype) not in _DTYPES:
        raise TypeError(f"attn_mask must be bool or floating; got {mask.dtype}")
    if mask.ndim > q.ndim:
        raise ValueError(f"attn_mask of shape {mask.shape} has more dims than query {q.shape}")
    mask = mask[(None,) * (q.ndim - mask.ndim)]
    L, S = q.shape[-2], k.shape[-2]
    if mask.shape[-2] not in (1, L) or mask.shape[-1] not in (1, S):
        raise ValueError(
            f"attn_mask of shape {mask.shape} does not broadcast to (..., L, S) = (..., {L}, {S})"
        )
    want = (q.chunks[-2], k.chunks[-2])
    if isinstance(mask, np.ndarray):
        chunks = [c if n > 1 else (n,) for n, c in zip(mask.shape, q.chunks[:-2] + want)]
        return da.from_array(mask, chunks=tuple(chunks))
    for axis, name in ((-2, "L"), (-1, "S")):
        if mask.shape[axis] > 1 and mask.chunks[axis] != want[axis + 2]:
            raise ValueError(
                f"attn_mask must be cut along {name} (dim {axis}) as the "
                f"{'query' if axis == -2 else 'key'} is: {want[axis + 2]}; got "
                f"{mask.chunks[axis]}: rechunk it with attn_mask.rechunk({{{axis}: ...}})"
            )
    return mask


@dataclass
class _Problem:
    """The operands, aligned, and what every block needs to know about the full call."""

    q: da.Array
    k: da.Array
    v: da.Array
    mask: da.Array | None
    opts: Options
    dtype: np.dtype
    index: dict[str, list[list[int]]]  # per operand, per batch dim: block read by query block b
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # per-head options, full shape
    qpos: np.ndarray = field(default_factory=lambda: np.zeros(()))  # position of query row 0
    kpos: np.ndarray = field(default_factory=lambda: np.zeros(()))  # position of key row 0
    lq: np.ndarray = field(default_factory=lambda: np.zeros(()))  # query rows (q_lengths or L)
    lk: np.ndarray = field(default_factory=lambda: np.zeros(()))  # keys (kv_lengths or S)


def _per_head(opts: Options, shape: tuple[int, ...], L: int, S: int) -> dict[str, np.ndarray]:
    """The per-head options that are set, checked and broadcast to query.shape[:-2]."""
    return {n: np.broadcast_to(a, shape) for n, a in per_head_arrays(opts, shape, L, S).items()}


def _prepare(query: Any, key: Any, value: Any, attn_mask: Any, opts: Options) -> _Problem:
    q, k, v = (_as_dask(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    dtype = _dtype(q, k, v)
    k, v = _pad(k, q.ndim, "key"), _pad(v, q.ndim, "value")
    if opts.enable_gqa and q.ndim < 3:
        raise ValueError(f"enable_gqa=True needs a head dim (dim -3); got query {q.shape}")
    _check_features(q, k, v)
    k, v, k_index, v_index = _align_kv(q, k, v, opts.enable_gqa)
    mask = _as_mask(attn_mask, q, k)
    index = {"key": k_index, "value": v_index}
    if mask is not None:
        index["attn_mask"] = []
        for axis in range(q.ndim - 2):
            mask, mi = _follow(mask, q, axis, "attn_mask")
            index["attn_mask"].append(mi)
    p = _Problem(q, k, v, mask, opts, dtype, index)
    shape, L, S = q.shape[:-2], q.shape[-2], k.shape[-2]
    p.heads = _per_head(opts, shape, L, S)

    def full(name: str, default: int) -> np.ndarray:
        return np.broadcast_to(p.heads.get(name, np.int64(default)), shape).astype(np.int64)

    p.lq, p.lk = full("q_lengths", L), full("kv_lengths", S)
    shift = p.lk - p.lq if opts.alignment == "bottom_right" else 0
    p.qpos, p.kpos = full("q_offset", 0) + shift, full("kv_offset", 0)
    if opts.window is not None:  # a side no pair is that far apart removes nothing: unbounded
        reach = L + S + int(np.max(np.abs(p.qpos - p.kpos), initial=0))
        left, right = (None if s is None or s >= reach else s for s in opts.window)
        p.opts = replace(opts, window=(left, right))
    return p


# ---- The graph: which pairs of blocks become tasks, and how their partials merge.


def _bounds(chunks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    stops = np.cumsum(np.asarray(chunks, np.int64))
    return stops - np.asarray(chunks, np.int64), stops


def _live_keys(p: _Problem, sl: tuple[slice, ...], qa: int, qb: int) -> list[int]:
    """The key blocks with a key that some row of query rows [qa, qb) attends, for some head of
    the batch block `sl`. Rows [qa, r1) (r1: q_lengths) at diagonals i + d reach keys
    [qa + d - left, r1 - 1 + d + right] together (causal: right <= 0), within [ka, min(kb, lk))."""
    starts, stops = _bounds(p.k.chunks[-2])
    d = (p.qpos[sl] - p.kpos[sl])[..., None]
    rows_end = np.minimum(qb, p.lq[sl])[..., None]
    keys_end = np.minimum(stops, p.lk[sl][..., None])
    lo, hi = np.broadcast_to(starts, keys_end.shape), keys_end - 1
    left, right = p.opts.window or (None, None)
    if p.opts.is_causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        lo = np.maximum(lo, qa + d - left)
    if right is not None:
        hi = np.minimum(hi, rows_end - 1 + d + right)
    live = (rows_end > qa) & (keys_end > starts) & (lo <= hi)
    return np.flatnonzero(live.reshape(-1, len(starts)).any(axis=0)).tolist()


def _kernel_kwargs(
    p: _Problem, sl: tuple[slice, ...], rows: tuple[int, int], keys: tuple[int, int], final: bool
) -> dict[str, Any]:
    """The options of the call over query rows `rows` and keys `keys` of batch block `sl`: the
    full call's positions (top-left diagonal, offsets) and lengths made local. A `final` call is
    the only one of its query block: it takes the sinks and returns what the caller asked for;
    the others return (out, lse) without sinks, for the merge."""
    o, (qa, qb), (ka, kb) = p.opts, rows, keys
    heads = {n: np.ascontiguousarray(a[sl]) for n, a in p.heads.items()}
    kw: dict[str, Any] = {
        "is_causal": o.is_causal,
        "scale": o.scale,
        "enable_gqa": o.enable_gqa,
        "window": o.window,
        "softcap": o.softcap,
        "alignment": "top_left",
        "q_offset": p.qpos[sl] + qa,
        "kv_offset": p.kpos[sl] + ka,
        "return_lse": o.return_lse if final else True,
    }
    if "alibi_slopes" in heads:
        kw["alibi_slopes"] = heads["alibi_slopes"]
    if "kv_lengths" in heads:
        kw["kv_lengths"] = np.clip(heads["kv_lengths"] - ka, 0, kb - ka)
    if "q_lengths" in heads:
        kw["q_lengths"] = np.clip(heads["q_lengths"] - qa, 0, qb - qa)
    if final and "sinks" in heads:
        kw["sinks"] = heads["sinks"]
    return kw


def _span(chunks: tuple[int, ...], i: int) -> tuple[int, int]:
    start = int(sum(chunks[:i]))
    return start, start + int(chunks[i])


def _attend_task(p: _Problem, bidx: tuple[int, ...], i: int, j: int, final: bool) -> tuple:
    sl = tuple(slice(*_span(c, b)) for c, b in zip(p.q.chunks, bidx))
    rows, keys = _span(p.q.chunks[-2], i), _span(p.k.chunks[-2], j)
    upcast = not final and p.dtype.itemsize < 4
    call = _Call(_kernel_kwargs(p, sl, rows, keys, final), p.dtype, upcast=upcast)

    def block(op: str) -> tuple[int, ...]:
        return tuple(p.index[op][a][b] for a, b in enumerate(bidx))

    mask = None
    if p.mask is not None:
        mi, mj = (i if p.mask.shape[-2] > 1 else 0), (j if p.mask.shape[-1] > 1 else 0)
        mask = (p.mask.name, *block("attn_mask"), mi, mj)
    key, value = (p.k.name, *block("key"), j, 0), (p.v.name, *block("value"), j, 0)
    return (_attend, call, (p.q.name, *bidx, i, 0), key, value, mask)


def _query_block(
    p: _Problem, name: str, bidx: tuple[int, ...], i: int, split_every: int
) -> dict[tuple, tuple]:
    """The tasks of one query block: a kernel call per live key block, the merge tree over
    them, and the result (at _result_key)."""
    sl = tuple(slice(*_span(c, b)) for c, b in zip(p.q.chunks, bidx))
    rows = _span(p.q.chunks[-2], i)
    live = _live_keys(p, sl, *rows)
    result = _result_key(name, (*bidx, i), p.opts.return_lse)
    dsk: dict[tuple, tuple] = {}
    if not live:
        shape = tuple(s.stop - s.start for s in sl) + (rows[1] - rows[0], p.q.shape[-1])
        kwargs = _kernel_kwargs(p, sl, rows, (0, 0), final=True)
        dsk[result] = (_no_keys, _Call(kwargs, p.dtype, shape, p.v.shape[-1]))
    elif len(live) == 1:
        dsk[result] = _attend_task(p, bidx, i, live[0], final=True)
    else:
        parts = []
        for j in live:
            parts.append((f"{name}-part", *bidx, i, j))
            dsk[parts[-1]] = _attend_task(p, bidx, i, j, final=False)
        for level in itertools.count():
            if len(parts) <= split_every:
                break
            groups = [parts[t : t + split_every] for t in range(0, len(parts), split_every)]
            parts = [(f"{name}-merge{level}", *bidx, i, t) for t in range(len(groups))]
            dsk.update({key: (_combine, *g) for key, g in zip(parts, groups)})
        dsk[result] = (_finish, _finish_of(p, sl, rows), *parts)
    return dsk


def _finish_of(p: _Problem, sl: tuple[slice, ...], rows: tuple[int, int]) -> _Finish:
    sinks = p.heads.get("sinks")
    if sinks is None:
        return _Finish(p.opts.return_lse, p.dtype)
    lengths = p.heads.get("q_lengths")
    local = None if lengths is None else np.clip(lengths[sl] - rows[0], 0, rows[1] - rows[0])
    return _Finish(p.opts.return_lse, p.dtype, np.ascontiguousarray(sinks[sl]), local)


def _result_key(name: str, idx: tuple[int, ...], return_lse: bool) -> tuple:
    """Where a block's result lies: the output block itself, or an (out, lse) pair."""
    return (f"{name}-result", *idx) if return_lse else (name, *idx, 0)


def _collection(name: str, dsk: dict, inputs: list[da.Array], chunks: tuple, meta: Any) -> Any:
    """A Dask array whose blocks are the tasks (name, *index) of `dsk`, which reads `inputs`."""
    if getattr(da, "array_expr_enabled", lambda: False)():  # (array.query-planning: True)
        from dask.array._array_expr._collection import from_graph

        layer: dict = {}
        for x in inputs:
            layer.update(x.__dask_graph__())
        layer.update(dsk)
        keys = [(name, *b) for b in itertools.product(*(range(len(c)) for c in chunks))]
        return from_graph(layer, meta, chunks, keys, name)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=inputs)
    return da.Array(graph, name, chunks=chunks, meta=meta)


def _as_arrays(
    name: str, dsk: dict, inputs: list[da.Array], chunks: tuple, dtype: np.dtype, lse: bool
) -> tuple[da.Array, da.Array | None]:
    """The output (chunks `chunks`, one along the last dim) and, with `lse`, the lse array, from
    a graph whose block results lie at _result_key."""
    blocks = list(itertools.product(*(range(len(c)) for c in chunks[:-1])))
    if lse:
        dsk.update({(name, *b, 0): (operator.getitem, (f"{name}-result", *b), 0) for b in blocks})
    out = _collection(name, dsk, inputs, chunks, np.empty((0,) * len(chunks), dtype))
    if not lse:
        return out, None
    lse_name = f"{name}-lse"
    lse_dsk = {(lse_name, *b): (operator.getitem, (f"{name}-result", *b), 1) for b in blocks}
    meta = np.empty((0,) * (len(chunks) - 1), np.float64 if dtype == np.float64 else np.float32)
    return out, _collection(lse_name, lse_dsk, [out], chunks[:-1], meta)


def _graph(p: _Problem, split_every: int) -> tuple[da.Array, da.Array | None]:
    mask = None if p.mask is None else p.mask.name
    token = tokenize(p.q.name, p.k.name, p.v.name, mask, vars(p.opts), split_every)
    name = f"sdpa-attention-{token}"
    dsk: dict[tuple, tuple] = {}
    for bidx in itertools.product(*(range(len(c)) for c in p.q.chunks[:-2])):
        for i in range(len(p.q.chunks[-2])):
            dsk.update(_query_block(p, name, bidx, i, split_every))
    inputs = [x for x in (p.q, p.k, p.v, p.mask) if x is not None]
    chunks = p.q.chunks[:-1] + ((p.v.shape[-1],),)
    return _as_arrays(name, dsk, inputs, chunks, p.dtype, p.opts.return_lse)


# ---- The public functions.


@takes_options(exclude=("out",))
def scaled_dot_product_attention(
    query: Any, key: Any, value: Any, attn_mask: Any = None, *, split_every: int = 4, **options: Any
) -> Any:
    """Scaled dot-product attention over Dask arrays: the result of
    :func:`sdpa.scaled_dot_product_attention` on the whole arrays, to float rounding.

    The work is cut along the chunks of the query (batch and head dims, L) and of the key and
    value (S). Each (batch block, query block, key block) becomes one kernel call, which reads
    one query block and one key/value block and returns a partial ``(out, lse)`` at the
    positions those blocks hold in the full sequences, so causal, windows and ALiBi apply as in
    one call. The partials of each query block are merged exactly (:func:`sdpa.merge_attention`)
    in a tree of `split_every`-way merges, which applies the sinks once. A pair of blocks that
    the causal rule, the window, ``kv_lengths`` or ``q_lengths`` leave without a single
    (query, key) pair to attend is never made a task: a causal graph over n x n blocks has
    n(n+1)/2 kernel calls. A query block with no key left gets zeros (lse -inf, or the sink)
    without reading any key. A mask cannot prune: its values are not known when the graph is
    built.

    Threads: see the module's docstring (:mod:`sdpa.dask`).

    Parameters
    ----------
    query : dask.array.Array or array_like, shape (..., L, E)
    key : dask.array.Array or array_like, shape (..., S, E)
    value : dask.array.Array or array_like, shape (..., S, Ev)
        NumPy arrays are taken as one chunk. E and Ev must each be one chunk (a ValueError says
        how to rechunk: a silent rechunk could hide a large transfer), and key and value must be
        cut alike along S. Key and value have the query's number of dims and each batch dim is
        the query's or 1; they are rechunked along the batch dims to the query's chunks if they
        differ (as Dask's blockwise does). With `enable_gqa`, each query head chunk must lie
        within one group of ``Hq // Hkv`` heads or start and end on group boundaries; key and
        value are cut along the heads to match.
    attn_mask : dask.array.Array or array_like, optional, broadcastable to (..., L, S)
        Boolean or floating, as in the NumPy function. A NumPy mask is cut to match; a Dask mask
        must be cut along L like the query and along S like the key (or have size 1 there).
    split_every : int, default 4
        How many partials one merge task combines (>= 2).
    {options}

    The per-head options are NumPy arrays (the graph is planned from them); there is no `out`.

    Returns
    -------
    out : dask.array.Array, shape (..., L, Ev), chunked like the query (one chunk along Ev);
        or ``(out, lse)`` with `return_lse`, lse of shape (..., L) chunked like the query.

    Examples
    --------
    >>> import dask.array as da, sdpa.dask
    >>> q = k = v = da.ones((1, 8, 4096, 64), chunks=(1, 8, 1024, 64), dtype="float32")
    >>> out = sdpa.dask.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.chunks[2], out.compute().shape
    ((1024, 1024, 1024, 1024), (1, 8, 4096, 64))
    """
    opts = Options.parse(options, exclude=("out",), where=_WHERE)
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2; got {split_every!r}")
    out, lse = _graph(_prepare(query, key, value, attn_mask, opts), split_every)
    return (out, lse) if opts.return_lse else out


# ---- Packed variable-length batches.

# The packed call's own exclusions, and the positions: a block holds whole sequences, at their
# own positions (see varlen_attention).
_VARLEN_EXCLUDED = (*_varlen._EXCLUDED, "q_offset", "kv_offset")


@dataclass(frozen=True, eq=False)
class _Packed:
    """One block of whole sequences: their local cumulative offsets and the options."""

    cu_q: np.ndarray
    cu_k: np.ndarray
    kwargs: dict[str, Any]


def _attend_packed(call: _Packed, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Any:
    _use_worker_threads()
    return _varlen.varlen_attention(q, k, v, call.cu_q, call.cu_k, **call.kwargs)


def _sequence_cuts(
    q_rows: tuple[int, ...], k_rows: tuple[int, ...], cu_q: np.ndarray, cu_k: np.ndarray
) -> list[int]:
    """The sequence index at which each row chunk ends: every chunk must hold whole sequences,
    the same ones in query and key."""
    if len(q_rows) != len(k_rows):
        raise ValueError(
            f"query and key must have as many row chunks (dim 0), each holding the same whole "
            f"sequences; got {len(q_rows)} and {len(k_rows)}"
        )
    cuts, previous = [0], 0
    for end_q, end_k in zip(np.cumsum(q_rows), np.cumsum(k_rows)):
        found = np.flatnonzero((cu_q == end_q) & (cu_k == end_k))
        found = found[found >= previous]
        if not found.size:
            raise ValueError(
                f"a row chunk ends at query row {end_q} and key row {end_k}, which is not where a "
                f"sequence ends in both (cu_seqlens_q, cu_seqlens_k): each chunk must hold whole "
                f"sequences, the same in query and key; rechunk both along dim 0 at sequence "
                f"boundaries, e.g. query.rechunk({{0: tuple(np.diff(cu_seqlens_q[cuts]))}})"
            )
        previous = int(found[0])
        cuts.append(previous)
    cuts[-1] = len(cu_q) - 1  # (the last chunk also takes any empty sequences at the end)
    return cuts


def _packed_operands(query: Any, key: Any, value: Any) -> tuple[da.Array, da.Array, da.Array]:
    q, k, v = (_as_dask(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    _dtype(q, k, v)
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim != 3:
            raise ValueError(f"{name} must have 3 dims (total, heads, features); got {a.shape}")
    if k.shape[2] != q.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"key must be (total_k, Hkv, E) and value (total_k, Hkv, Ev) with query "
            f"(total_q, Hq, E); got query {q.shape}, key {k.shape}, value {v.shape}"
        )
    _whole_features(q, k, v)
    _keys_alike(k, v, 0, "the rows")
    return q, k, v


def _packed_kwargs(
    opts: Options, seqs: tuple[int, int], heads: tuple[int, int], n: int, hq: int
) -> dict[str, Any]:
    """The options of one block (sequences `seqs`, query heads `heads`): ALiBi slopes and sinks
    (per head or per (sequence, head)) sliced to it."""
    kwargs = {name: getattr(opts, name) for name in ("is_causal", "scale", "window", "softcap")}
    kwargs["return_lse"] = opts.return_lse
    for name in ("alibi_slopes", "sinks"):
        a = getattr(opts, name)
        if a is not None:
            try:
                a = np.broadcast_to(a.astype(np.float64), (n, hq))
            except ValueError:
                raise ValueError(
                    f"{name} of shape {a.shape} must broadcast to (batch, Hq) = ({n}, {hq})"
                ) from None
            kwargs[name] = np.ascontiguousarray(a[slice(*seqs), slice(*heads)])
    return kwargs


def _packed_graph(
    q: da.Array, k: da.Array, v: da.Array, cu: tuple[np.ndarray, np.ndarray], opts: Options
) -> tuple[da.Array, da.Array | None]:
    """One task per (block of whole sequences, block of query heads): no merge."""
    cu_q, cu_k = cu
    cuts = _sequence_cuts(q.chunks[0], k.chunks[0], cu_q, cu_k)
    k, v, kv_index = _gqa_heads(q, k, v, 1)
    hq = q.shape[1]
    name = f"sdpa-varlen-{tokenize(q.name, k.name, v.name, cu_q, cu_k, vars(opts))}"
    dsk: dict[tuple, tuple] = {}
    for c, (s0, s1) in enumerate(zip(cuts, cuts[1:])):
        local = (cu_q[s0 : s1 + 1] - cu_q[s0], cu_k[s0 : s1 + 1] - cu_k[s0])
        for h, kh in enumerate(kv_index):
            heads = _span(q.chunks[1], h)
            call = _Packed(*local, _packed_kwargs(opts, (s0, s1), heads, len(cu_q) - 1, hq))
            refs = [(q.name, c, h, 0), (k.name, c, kh, 0), (v.name, c, kh, 0)]
            dsk[_result_key(name, (c, h), opts.return_lse)] = (_attend_packed, call, *refs)
    dtype = _dtype(q, k, v)
    chunks = q.chunks[:2] + ((v.shape[2],),)
    return _as_arrays(name, dsk, [q, k, v], chunks, dtype, opts.return_lse)


@takes_options(exclude=_VARLEN_EXCLUDED)
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
    """:func:`sdpa.varlen_attention` over Dask arrays: packed sequences of different lengths,
    a block of whole sequences per task.

    Each row chunk (dim 0) of the query must hold whole sequences, and the same chunk of the key
    and value the same sequences (a ValueError says where a chunk cuts a sequence). That is the
    corpus case, many sequences: each block is one packed kernel call, with no merge. A
    sequence too long for one task is the other case: give it to
    :func:`scaled_dot_product_attention` as a (1, H, L, E) array, whose key chunks merge exactly.
    (Whole sequences only: a part of one in a block would need its rows' and keys' positions
    within the sequence and its key chunks merged, which is what
    :func:`scaled_dot_product_attention` plans.) Head chunks follow the rule of
    :func:`scaled_dot_product_attention` under GQA.

    Parameters
    ----------
    query : dask.array.Array, shape (total_q, Hq, E)
    key : dask.array.Array, shape (total_k, Hkv, E)
    value : dask.array.Array, shape (total_k, Hkv, Ev)
        E and Ev one chunk each; key and value cut alike along the rows.
    cu_seqlens_q, cu_seqlens_k : NumPy int arrays, shape (batch + 1,)
        Cumulative offsets, as in :func:`sdpa.varlen_attention` (the graph is planned from them).
    max_seqlen_q, max_seqlen_k : int, optional
        Checked to be at least the longest sequence.
    {options}

    Returns
    -------
    out : dask.array.Array, shape (total_q, Hq, Ev), chunked like the query; or ``(out, lse)``
    with `return_lse`, lse of shape (total_q, Hq).
    """
    opts = Options.parse(options, exclude=_VARLEN_EXCLUDED, where="sdpa.dask.varlen_attention")
    q, k, v = _packed_operands(query, key, value)
    starts_q, _ = _varlen._offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
    starts_k, _ = _varlen._offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    if len(starts_q) != len(starts_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got "
            f"{len(starts_q)} and {len(starts_k)}"
        )
    cu = (np.append(starts_q, q.shape[0]), np.append(starts_k, k.shape[0]))
    out, lse = _packed_graph(q, k, v, cu, opts)
    return (out, lse) if opts.return_lse else out
