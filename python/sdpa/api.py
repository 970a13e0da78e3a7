"""The public attention API: argument checking, broadcasting and dtype policy.

A call goes through named steps: the options are parsed into an :class:`~sdpa._options.Options`
record; ``_operands`` checks query, key and value and applies the dtype policy; ``_mask`` sorts
out the mask; ``_layout`` works out the broadcast batch shape and the GQA grouping; ``_outputs``
checks ``out`` and allocates the results; ``_views`` lays every operand out for the kernel (as
zero-stride views, never copies); and ``_run`` hands them, with the record, to the core. So the
binding only converts and the kernel only computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._options import DIRECT, PER_HEAD, Options, default_of, takes_options
from ._quant import QuantizedKV, storage_arrays

__all__ = ["attention_weights", "scaled_dot_product_attention"]

_DTYPES = frozenset(_core.dtypes)  # the storage types the kernel computes in their own right
_ACCEPTED = "float16, bfloat16 (ml_dtypes), float32 or float64"
# Key/value storage read as such under a query of another dtype (mixed storage): the result then
# has the query's dtype.
_NARROW_KV = frozenset({"float16", "bfloat16"})
_NAMES: dict[np.dtype, str] = {}
# The options the direct route does not honour, at the values that leave a call plain (their
# defaults, as in f(q, k, v, enable_gqa=False)): given so, the route still takes the call.
_core.set_plain_defaults(
    {f: default_of(f) for f in Options.__dataclass_fields__ if f not in DIRECT}
)


def _name(dtype: np.dtype) -> str:
    """dtype.name, cached: NumPy computes it in Python, at a few microseconds a call."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = dtype.name
    return name


@takes_options(exclude=())
def scaled_dot_product_attention(
    query: Any, key: Any, value: Any, attn_mask: Any = None, **options: Any
) -> Any:
    """Scaled dot-product attention, ``softmax(scale * q @ k^T + mask) @ v``, computed blockwise.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like or QuantizedKV, shape (..., S, Ev)
        float16, bfloat16 (``ml_dtypes``), float32 or float64; key and value may instead both be
        :class:`sdpa.QuantizedKV` (8-bit). Leading (batch) dims broadcast by NumPy rules.
        float16 and bfloat16 are read and written as such and accumulated in float32. The
        output dtype is the query's when key and value are both float16, both bfloat16 or both
        QuantizedKV (mixed storage: each operand is read in its own type, nothing is cast or
        copied), else ``np.result_type(query, key, value)``.
    attn_mask : array_like, optional, broadcastable to (..., L, S)
        Boolean (True = may attend) or floating (added to the scaled scores). Its leading dims
        take part in the batch broadcast.
    {options}

    Returns
    -------
    out : ndarray, shape (..., L, Ev), or ``(out, lse)`` with `return_lse`.

    Notes
    -----
    Order: ``s = scale * q.k``; softcap; ``+ attn_mask`` (float); ``+ ALiBi``; then every boolean
    restriction (bool mask, causal, window, kv_lengths) removes keys. A query row left with no
    key to attend to gets output 0 (never NaN) and lse -inf (the sink, with ``sinks``); a padding
    row (``q_lengths``) gets 0 and -inf whatever else.
    """
    if attn_mask is None:  # the direct route honours DIRECT options and declines the rest
        result = _core.attention_direct(query, key, value, options)
        if result is not None:
            return result
    opts = Options.parse(options, where="scaled_dot_product_attention")
    call = _prepare(query, key, value, attn_mask, opts)
    out, lse, _ = _run(call, want_weights=False)
    return (out, lse) if opts.return_lse else out


@takes_options(exclude=("out", "return_lse"))
def attention_weights(query: Any, key: Any, *, attn_mask: Any = None, **options: Any) -> np.ndarray:
    """The attention probabilities ``softmax(scores)``, shape (..., L, S).

    Takes the arguments of :func:`scaled_dot_product_attention` (without `value`) with the same
    meaning; the dtype is ``np.result_type(query, key)``. Each row sums to 1, or is all 0 for a
    query row left with no key. Unlike the attention output, this materialises the L x S matrix
    (it is the result); the kernel computes it blockwise in two passes (row max and sum, then the
    probabilities).

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    attn_mask : array_like, optional, broadcastable to (..., L, S)
        Keyword-only here (a value array passed by habit in third place would otherwise be taken
        for a float mask).
    {options}
    """
    opts = Options.parse(options, exclude=("out", "return_lse"), where="attention_weights")
    k = _as_operand(key, "key")
    if isinstance(k, QuantizedKV):
        value: Any = QuantizedKV.empty(k.shape[:-1] + (0,), block=k.block)
    else:
        value = np.empty(k.shape[:-1] + (0,), k.dtype)
    _, _, weights = _run(_prepare(query, k, value, attn_mask, opts), want_weights=True)
    assert weights is not None
    return weights


def _inner_path(query: Any, key: Any, value: Any, attn_mask: Any = None, **options: Any) -> str:
    """The kernel's inner path ("panels", "few_rows" or "general") for the first row tile of
    this call, as the general route would lay it out (for tests and diagnostics)."""
    call = _prepare(query, key, value, attn_mask, Options.parse(options))
    shape = call.batch + (call.L, call.v.shape[-1])
    lse = np.empty(call.batch + (call.L,), call.kernel_acc_dtype) if call.opts.return_lse else None
    results = {"out": np.empty(shape, call.kernel_dtype), "lse": lse}
    return _core.inner_path(_views(call, results, _per_head(call)), call.opts, call.kv_block)


@dataclass
class _Call:
    """One call, checked and laid out: what the steps below work out, in order."""

    q: np.ndarray
    k: np.ndarray | QuantizedKV
    v: np.ndarray | QuantizedKV
    dtype: np.dtype  # of the result (the storage type)
    kernel_dtype: np.dtype  # what the kernel reads and writes on the query side (see _precision)
    kv_dtype: np.dtype  # what the kernel reads key and value as (int8: QuantizedKV)
    opts: Options
    mask: np.ndarray | None = None
    mask_name: str = ""  # "bool_mask" or "float_mask": the kernel operand it becomes
    batch: tuple[int, ...] = ()  # the result's batch shape
    outer: tuple[int, ...] = ()  # batch without the query heads' group split (GQA)
    groups: int = 1  # query heads per key/value head

    @property
    def kv_block(self) -> int:
        """Elements per scale of QuantizedKV key/value (0 for float ones)."""
        return self.k.block if isinstance(self.k, QuantizedKV) else 0

    @property
    def acc_dtype(self) -> np.dtype:
        """The dtype of the returned lse: the result's accumulation dtype."""
        return np.dtype(np.float64 if self.dtype == np.float64 else np.float32)

    @property
    def kernel_acc_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.kernel_dtype == np.float64 else np.float32)

    @property
    def L(self) -> int:
        return int(self.q.shape[-2])

    @property
    def S(self) -> int:
        return int(self.k.shape[-2])


def _prepare(query: Any, key: Any, value: Any, attn_mask: Any, opts: Options) -> _Call:
    call = _operands(query, key, value, opts)
    call.kernel_dtype = _precision(call)
    _mask(call, attn_mask)
    _layout(call)
    return call


def _no_masked_array(x: Any, name: str) -> None:
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray, whose mask sdpa would ignore; pass plain data "
            f"({name}.filled(...)) and say what to leave out with attn_mask or kv_lengths"
        )


def _as_operand(x: Any, name: str) -> Any:
    """An ndarray of an accepted dtype with at least 2 dims (or, for key and value, a
    QuantizedKV with at least 2)."""
    if isinstance(x, QuantizedKV):
        if name not in ("key", "value"):
            raise TypeError(f"{name} cannot be a QuantizedKV (key and value can)")
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims; got shape {x.shape}")
        return x
    _no_masked_array(x, name)
    a = np.asarray(x)
    if _name(a.dtype) not in _DTYPES:
        raise TypeError(f"{name} must have dtype {_ACCEPTED}; got {a.dtype}")
    if a.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dims (..., rows, features); got shape {a.shape}"
        )
    return a


def _operands(query: Any, key: Any, value: Any, opts: Options) -> _Call:
    """Checks query, key and value and applies the dtype policy."""
    q = _as_operand(query, "query")
    k = _as_operand(key, "key")
    v = _as_operand(value, "value")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"key.shape[-1] must equal query.shape[-1] (E); got query {q.shape}, key {k.shape}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"value.shape[-2] must equal key.shape[-2] (S); got key {k.shape}, value {v.shape}"
        )
    dtype, kv_dtype = _dtypes(q, k, v)
    return _Call(q, k, v, dtype, dtype, kv_dtype, opts)


def _dtypes(q: np.ndarray, k: Any, v: Any) -> tuple[np.dtype, np.dtype]:
    """The dtype policy: (the result's dtype, the dtype the kernel reads key and value in).
    Key and value both float16, both bfloat16 or both QuantizedKV are read in their own storage
    and the result has the query's dtype (mixed storage, no cast copy); otherwise the three
    promote by NumPy rules (np.result_type)."""
    quantized = [isinstance(x, QuantizedKV) for x in (k, v)]
    if any(quantized):
        if not all(quantized):
            raise TypeError("key and value must both be QuantizedKV or neither")
        if k.block != v.block:
            raise ValueError(f"key and value must share a block size; got {k.block} and {v.block}")
        return _native_order(q.dtype), np.dtype(np.int8)
    if k.dtype == v.dtype and _name(k.dtype) in _NARROW_KV:
        return _native_order(q.dtype), _native_order(k.dtype)
    try:
        dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    except TypeError:  # e.g. float16 key with bfloat16 value: NumPy has no common type
        dtype = None
    if dtype is None or _name(dtype) not in _DTYPES:
        got = "have no common dtype" if dtype is None else f"promote to {dtype}"
        raise TypeError(
            f"query, key and value ({q.dtype}, {k.dtype}, {v.dtype}) {got}; the accepted "
            f"dtypes are {_ACCEPTED}"
        )
    return dtype, dtype


def _native_order(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.isnative else dtype.newbyteorder("=")


_F32_MAX = float(np.finfo(np.float32).max)


def _precision(call: _Call) -> np.dtype:
    return _precision_of(call.opts, call.dtype, call.q)


def _precision_of(o: Options, dtype: np.dtype, q: np.ndarray) -> np.dtype:
    """The storage type the kernel computes in: the result's, unless a scale, softcap or ALiBi
    slope lies beyond float32's range, which only float64 can carry (float16, bfloat16 and
    float32 compute in float32), or the scale makes a query overflow it (the kernel scales the
    query first); then the operands are converted to float64 and back."""
    scale = abs(o.scale) if o.scale is not None else 0.0
    if scale > 1 and q.size:  # (the direct route leaves every such scale to this check)
        scale *= float(np.max(np.abs(q)))
    huge = [scale, o.softcap or 0.0]
    if o.softcap is not None and o.softcap * _F32_MAX < 1:  # (its inverse would overflow)
        huge.append(np.inf)
    if o.alibi_slopes is not None and o.alibi_slopes.size:
        huge.append(float(np.max(np.abs(o.alibi_slopes))))
    return np.dtype(np.float64) if max(huge) > _F32_MAX else np.dtype(dtype)


def _native(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`a` as an aligned, native-byte-order array of `dtype` (a copy only when needed)."""
    if a.dtype != dtype or not a.dtype.isnative or not a.flags.aligned:
        a = a.astype(dtype)  # astype always returns an aligned array in native order here
    return a


def key_operands(name: str, x: Any, kv_dtype: np.dtype) -> dict[str, np.ndarray]:
    """The kernel operands that hold key-side `x` ("key" or "value"), in storage: the array in
    kv_dtype, or a QuantizedKV's int8 values and float16 scales (name + "_scales")."""
    if isinstance(x, QuantizedKV):
        x._check(name)
        return {name: x.values, name + "_scales": _native(x.scales, np.dtype(np.float16))}
    return {name: _native(x, kv_dtype)}


def _mask(call: _Call, attn_mask: Any) -> None:
    """The mask's kernel operand: bool, or floating in the computation dtype. Finite values
    beyond that dtype's range saturate to its largest finite value rather than overflowing to
    inf (which would remove keys that the float64 reference keeps); -inf stays -inf."""
    if attn_mask is None:
        return
    _no_masked_array(attn_mask, "attn_mask")
    mask = np.asarray(attn_mask)
    if mask.dtype == np.bool_:
        call.mask_name = "bool_mask"
    elif _name(mask.dtype) in _DTYPES:
        call.mask_name = "float_mask"
        acc = call.kernel_acc_dtype
        if mask.dtype.itemsize > acc.itemsize:
            info = np.finfo(acc)
            mask = np.where(np.isinf(mask), mask, np.clip(mask, info.min, info.max))
        mask = _native(mask, acc)
    else:
        raise TypeError(f"attn_mask must be bool or floating ({_ACCEPTED}); got {mask.dtype}")
    if mask.ndim < 2:
        mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
    if mask.shape[-2] not in (1, call.L) or mask.shape[-1] not in (1, call.S):
        raise ValueError(
            f"attn_mask of shape {mask.shape} does not broadcast to (..., L, S) = "
            f"(..., {call.L}, {call.S}); query {call.q.shape}, key {call.k.shape}"
        )
    call.mask = mask


def _broadcast(shapes: list[tuple[str, tuple[int, ...]]], what: str) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(*[s for _, s in shapes])  # type: ignore[misc]
    except ValueError:
        listed = ", ".join(f"{n} {s}" for n, s in shapes)
        raise ValueError(f"{what} do not broadcast: {listed}") from None


def _layout(call: _Call) -> None:
    """The broadcast batch shape, and with enable_gqa the grouping of the query heads."""
    q, k, v = call.q, call.k, call.v
    mask_batch = call.mask.shape[:-2] if call.mask is not None else ()
    if call.opts.enable_gqa:
        _layout_gqa(call, mask_batch)
    else:
        shapes = [("query", q.shape[:-2]), ("key", k.shape[:-2]), ("value", v.shape[:-2])]
        if call.mask is not None:
            shapes.append(("attn_mask", mask_batch))
        try:
            call.batch = call.outer = _broadcast(shapes, "batch dims (all but the last 2)")
        except ValueError as e:
            if q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
                raise ValueError(f"{e}; for grouped-query attention pass enable_gqa=True") from None
            raise
    if len(call.batch) + 1 > _core.max_batch_dims:  # the kernel adds the group dim G
        raise ValueError(
            f"too many batch dims ({len(call.batch)}); at most {_core.max_batch_dims - 1}"
        )


def _layout_gqa(call: _Call, mask_batch: tuple[int, ...]) -> None:
    q, k, v = call.q, call.k, call.v
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim < 3:
            raise ValueError(
                f"enable_gqa=True needs a head dim: {name} must have at least 3 dims "
                f"(..., H, rows, features); got shape {a.shape}"
            )
    hq, hkv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hkv:
        raise ValueError(
            f"key and value must have the same number of heads (dim -3); got key {k.shape}, "
            f"value {v.shape}"
        )
    if (hq % hkv != 0) if hkv else hq != 0:
        raise ValueError(
            f"enable_gqa=True: query heads (dim -3, Hq={hq}) must be a multiple of key/value "
            f"heads (Hkv={hkv}); got query {q.shape}, key {k.shape}"
        )
    call.groups = hq // hkv if hkv else 1
    if mask_batch and mask_batch[-1] not in (1, hq):
        raise ValueError(
            f"attn_mask of shape {call.mask.shape} does not broadcast over {hq} query heads "  # type: ignore[union-attr]
        )
    shapes = [("query", q.shape[:-3]), ("key", k.shape[:-3]), ("value", v.shape[:-3])]
    if len(mask_batch) > 1:
        shapes.append(("attn_mask", mask_batch[:-1]))
    call.outer = _broadcast(shapes, "batch dims (all but the last 3)")
    call.batch = call.outer + (hq,)


def _check_out(call: _Call, out: np.ndarray) -> None:
    shape = call.batch + (call.L, call.v.shape[-1])
    if out.shape != shape or out.dtype.newbyteorder("=") != call.dtype:
        raise ValueError(
            f"out must have shape {shape} and dtype {call.dtype}; got shape {out.shape} and "
            f"dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if _overlaps_itself(out):
        raise ValueError(
            f"out must not overlap itself; got shape {out.shape} with strides {out.strides}"
        )


def _overlaps_itself(a: np.ndarray) -> bool:
    """Whether two elements of `a` share memory (an empty array never does)."""
    if a.size <= 1:
        return False
    # Nested dims (each stride spans the dims inside it) cannot overlap: the usual case, cheap.
    extent = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < extent:
            break
        extent += stride * (n - 1)
    else:
        return False
    # Otherwise look at every element's byte offset.
    offsets = np.zeros((), np.int64)
    for stride, n in zip(a.strides, a.shape):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * stride)
    offsets = np.sort(offsets, axis=None)
    return bool(np.any(np.diff(offsets) < a.itemsize))


def _per_head(call: _Call) -> dict[str, np.ndarray]:
    return per_head_arrays(call.opts, call.q.shape[:-2], call.L, call.S)


def per_head_arrays(
    opts: Options, head_shape: tuple[int, ...], L: int, S: int
) -> dict[str, np.ndarray]:
    """The per-head options that are set, checked to broadcast to query.shape[:-2] (head_shape)
    and in their kernel dtype (shared with sdpa.dask)."""
    arrays = {}
    for name, spec in PER_HEAD.items():
        a = getattr(opts, name)
        if a is None:
            continue
        try:
            ok = np.broadcast_shapes(a.shape, head_shape) == head_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} of shape {a.shape} must broadcast to query.shape[:-2] = {head_shape}"
            )
        a = a.astype(spec.dtype)
        spec.check(a, L, S, name)
        arrays[name] = a
    return arrays


def _run(
    call: _Call, want_weights: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Allocates the results, lays every operand out for the kernel and runs it."""
    out = call.opts.out
    if out is not None:
        _check_out(call, out)
    per_head = _per_head(call)
    target, lse, weights = _results(call, want_weights)
    if any(a is not None and a.size for a in (target, lse, weights)):
        results = {"out": target, "lse": lse, "weights": weights}
        _core.attention(_views(call, results, per_head), call.opts, call.kv_block)
    if call.kernel_dtype != call.dtype:  # (computed in float64: back to the result's types)
        with np.errstate(over="ignore"):  # (an lse beyond float32's range rounds to +-inf)
            lse = None if lse is None else lse.astype(call.acc_dtype)
        weights = None if weights is None else weights.astype(call.dtype)
        if out is None:
            target = target.astype(call.dtype)
    if out is None:
        return target, lse, weights
    if target is not out:
        out[...] = target
    return out, lse, weights


def _results(
    call: _Call, want_weights: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The arrays the kernel writes: out (the caller's `out` itself when the kernel can write it
    directly and it overlaps no input), lse and weights, in the kernel's types."""
    out = call.opts.out
    kernel = call.kernel_dtype
    inputs = [
        a
        for a in (call.q, *storage_arrays(call.k), *storage_arrays(call.v), call.mask)
        if a is not None
    ]
    if (
        out is not None
        and out.dtype == kernel
        and out.dtype.isnative
        and out.flags.aligned
        and not any(np.may_share_memory(out, a) for a in inputs)
    ):
        target = out
    else:
        target = np.empty(call.batch + (call.L, call.v.shape[-1]), kernel)
    lse = np.empty(call.batch + (call.L,), call.kernel_acc_dtype) if call.opts.return_lse else None
    weights = np.empty(call.batch + (call.L, call.S), kernel) if want_weights else None
    return target, lse, weights


def _views(
    call: _Call, results: dict[str, np.ndarray | None], per_head: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every operand as a (outer..., heads, G, core...) view, keyed by its kernel name; key and
    value have a group dim of 1."""
    batch, L, S, E, Ev = call.batch, call.L, call.S, call.q.shape[-1], call.v.shape[-1]
    gqa = len(batch) != len(call.outer)
    kv_batch = call.outer + (call.k.shape[-3],) if gqa else batch

    # (reshape only splits a dim or inserts one of size 1 here, which never copies)
    def query_side(a: np.ndarray, core: tuple[int, ...]) -> np.ndarray:
        # (broadcast_to views are read-only: out, lse and weights already have the shape)
        if a.shape != batch + core:
            a = np.broadcast_to(a, batch + core)
        if gqa:  # the query heads, the last batch dim, split into (Hkv, G)
            return a.reshape(batch[:-1] + (batch[-1] // call.groups, call.groups) + core)
        return a.reshape(batch + (1,) + core)

    def key_side(a: np.ndarray, core: tuple[int, ...]) -> np.ndarray:
        if a.shape != kv_batch + core:
            a = np.broadcast_to(a, kv_batch + core)
        return a.reshape(kv_batch + (1,) + core)

    views = {"query": query_side(_native(call.q, call.kernel_dtype), (L, E))}
    for name, x in (("key", call.k), ("value", call.v)):
        for n, a in key_operands(name, x, call.kv_dtype).items():
            views[n] = key_side(a, (S, a.shape[-1]))
    if call.mask is not None:
        views[call.mask_name] = query_side(call.mask, (L, S))
    cores = {"out": (L, Ev), "lse": (L,), "weights": (L, S)}
    views.update({n: query_side(a, cores[n]) for n, a in results.items() if a is not None})
    views.update({n: query_side(a, ()) for n, a in per_head.items()})
    return views
