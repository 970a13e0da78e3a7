"""The public attention API: argument checking, broadcasting and dtype policy.

Everything the compiled core needs arrives here already checked, broadcast (as zero-stride views,
never copies) and cast, so the binding only converts and the kernel only computes.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np

from . import _core

__all__ = ["attention_weights", "scaled_dot_product_attention"]

_DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
_ACCEPTED = "float16, bfloat16 (ml_dtypes), float32 or float64"
_ALIGNMENTS = ("top_left", "bottom_right")


def _is_float(dt: np.dtype) -> bool:
    return dt.name in _DTYPE_CODES


def _as_operand(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if not _is_float(a.dtype):
        raise TypeError(f"{name} must have dtype {_ACCEPTED}; got {a.dtype}")
    if a.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dims (..., rows, features); got shape {a.shape}"
        )
    return a


def _native(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`a` as an aligned, native-byte-order array of `dtype` (a copy only when needed)."""
    if a.dtype != dtype or not a.dtype.isnative or not a.flags.aligned:
        a = a.astype(dtype)  # astype always returns an aligned array in native order here
    return a


def _mask_in(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float mask in the computation dtype. Finite values beyond its range saturate to its
    largest finite value rather than overflowing to inf (which would remove keys that the
    float64 reference keeps); -inf stays -inf."""
    if mask.dtype.itemsize > dtype.itemsize:
        info = np.finfo(dtype)
        mask = np.where(np.isinf(mask), mask, np.clip(mask, info.min, info.max))
    return _native(mask, dtype)


def _broadcast(shapes: list[tuple[str, tuple[int, ...]]], what: str) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(*[s for _, s in shapes])  # type: ignore[misc]
    except ValueError:
        listed = ", ".join(f"{n} {s}" for n, s in shapes)
        raise ValueError(f"{what} do not broadcast: {listed}") from None


def _add_group_dim(a: np.ndarray, axis_from_end: int, groups: int) -> np.ndarray:
    """Split dim `-axis_from_end` (size H) into (H // groups, groups) without copying."""
    ax = a.ndim - axis_from_end
    h = a.shape[ax]
    shape = a.shape[:ax] + (h // groups, groups) + a.shape[ax + 1 :]
    st = a.strides[ax]
    strides = a.strides[:ax] + (st * groups, st) + a.strides[ax + 1 :]
    return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=a.flags.writeable)


def _int_arg(x: Any, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int; got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(x).__name__}") from None


def _real_arg(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _per_head(x: Any, name: str, head_shape: tuple[int, ...], kind: str) -> np.ndarray:
    """A per-(batch, head) argument, checked to broadcast to query.shape[:-2]."""
    a = np.asarray(x)
    if kind == "int" and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype; got {a.dtype}")
    if kind == "float" and a.dtype.kind not in "fiu" and not _is_float(a.dtype):
        raise TypeError(f"{name} must have a real dtype; got {a.dtype}")
    try:
        ok = np.broadcast_shapes(a.shape, head_shape) == head_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {a.shape} must broadcast to query.shape[:-2] = {head_shape}"
        )
    return a.astype(np.int64 if kind == "int" else np.float64)


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    out: np.ndarray | None = None,
    alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    kv_lengths: Any = None,
    return_lse: bool = False,
) -> Any:
    """Scaled dot-product attention, ``softmax(scale * q @ k^T + mask) @ v``, computed blockwise.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
        float16, bfloat16 (``ml_dtypes``), float32 or float64. Leading (batch) dims broadcast by
        NumPy rules. The output dtype is ``np.result_type(query, key, value)``; float16 and
        bfloat16 are read and written as such and accumulated in float32.
    attn_mask : array_like, optional, broadcastable to (..., L, S)
        Boolean (True = may attend) or floating (added to the scaled scores). Its leading dims
        take part in the batch broadcast.
    is_causal : bool
        Query i attends only keys j <= diag(i) (see `alignment`). Combines with `attn_mask`.
    scale : float, optional
        Multiplies ``q @ k^T``; default ``1 / sqrt(E)`` (1 when E == 0). Must be finite.
    enable_gqa : bool
        Grouped-query attention: dim -3 of query (Hq) may be a multiple of dim -3 of key and
        value (Hkv); query head h uses key/value head ``h // (Hq // Hkv)``. Nothing is copied.
    out : ndarray, optional, shape (..., L, Ev)
        Receives the result; must have the result's shape and dtype.
    alignment : {"top_left", "bottom_right"}
        Where the diagonal of the L x S score matrix sits: diag(i) = i ("top_left", PyTorch's
        ``is_causal``) or i + S - L ("bottom_right", FlashAttention's convention, for KV-cache
        decoding and chunked prefill). Applies to `is_causal`, `window` and `alibi_slopes`.
    window : (left, right), optional
        Query i attends key j only if ``diag(i) - left <= j <= diag(i) + right``; None on a side
        means unbounded. ``is_causal=True`` is the same as ``right = 0``.
    alibi_slopes : array_like, optional, broadcastable to query.shape[:-2]
        Adds ``-slope * |j - diag(i)|`` to the scores.
    softcap : float, optional
        Positive; scores become ``softcap * tanh(scores / softcap)`` after scaling and before any
        mask or ALiBi is added.
    kv_lengths : array_like of int, optional, broadcastable to query.shape[:-2]
        Keys ``j >= length`` are removed (padded batches). Each length lies in [0, S].
    return_lse : bool
        Also return the log-sum-exp of the scores over the keys that remain, shape (..., L),
        float64 for float64 results and float32 otherwise (-inf for a row with no key).

    Returns
    -------
    out : ndarray, shape (..., L, Ev), or ``(out, lse)`` with `return_lse`.

    Notes
    -----
    Order: ``s = scale * q.k``; softcap; ``+ attn_mask`` (float); ``+ ALiBi``; then every boolean
    restriction (bool mask, causal, window, kv_lengths) removes keys. A query row left with no
    key to attend to gets output 0 (never NaN) and lse -inf.
    """
    if (
        attn_mask is None
        and not enable_gqa
        and not return_lse
        and window is None
        and alibi_slopes is None
        and softcap is None
        and kv_lengths is None
        and alignment == "top_left"
    ):
        result = _core.attention_fast(query, key, value, out, bool(is_causal), scale)
        if result is not None:
            return result
    result, lse, _ = _attention(
        query,
        key,
        value,
        attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        out=out,
        alignment=alignment,
        window=window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        kv_lengths=kv_lengths,
        want_lse=return_lse,
        want_weights=False,
    )
    return (result, lse) if return_lse else result


def attention_weights(
    query: Any,
    key: Any,
    attn_mask: Any = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    kv_lengths: Any = None,
) -> np.ndarray:
    """The attention probabilities ``softmax(scores)``, shape (..., L, S).

    Takes the arguments of :func:`scaled_dot_product_attention` (without `value`) with the same
    meaning; the dtype is ``np.result_type(query, key)``. Each row sums to 1, or is all 0 for a
    query row left with no key. Unlike the attention output, this materialises the L x S matrix
    (it is the result); the kernel computes it blockwise in two passes (row max and sum, then the
    probabilities).
    """
    k = _as_operand(key, "key")
    value = np.empty(k.shape[:-1] + (0,), k.dtype)
    _, _, weights = _attention(
        query,
        k,
        value,
        attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        out=None,
        alignment=alignment,
        window=window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        kv_lengths=kv_lengths,
        want_lse=False,
        want_weights=True,
    )
    assert weights is not None
    return weights


def _attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any,
    *,
    is_causal: bool,
    scale: Any,
    enable_gqa: bool,
    out: Any,
    alignment: str,
    window: Any,
    alibi_slopes: Any,
    softcap: Any,
    kv_lengths: Any,
    want_lse: bool,
    want_weights: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Checks, broadcasting and dtype policy shared by the public functions; runs the core."""
    q = _as_operand(query, "query")
    k = _as_operand(key, "key")
    v = _as_operand(value, "value")
    L, E = q.shape[-2:]
    S = k.shape[-2]
    Ev = v.shape[-1]
    if k.shape[-1] != E:
        raise ValueError(
            f"key.shape[-1] must equal query.shape[-1] (E); got query {q.shape}, key {k.shape}"
        )
    if v.shape[-2] != S:
        raise ValueError(
            f"value.shape[-2] must equal key.shape[-2] (S); got key {k.shape}, value {v.shape}"
        )
    try:
        dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    except TypeError:  # e.g. float16 with bfloat16: NumPy has no common type
        dtype = None
    if dtype is None or not _is_float(dtype):
        got = "have no common dtype" if dtype is None else f"promote to {dtype}"
        raise TypeError(
            f"query, key and value ({q.dtype}, {k.dtype}, {v.dtype}) {got}; the accepted "
            f"dtypes are {_ACCEPTED}"
        )
    acc_dtype = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)

    if scale is None:
        scale_value = 1.0 / math.sqrt(E) if E > 0 else 1.0
    else:
        scale_value = _real_arg(scale, "scale")
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right'; got {alignment!r}")
    window_left, window_right = -1, -1
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"window must be a pair (left, right); got {window!r}")
        sides = []
        for side_name, side in zip(("window[0] (left)", "window[1] (right)"), window):
            if side is None:
                sides.append(-1)
                continue
            n = _int_arg(side, side_name)
            if n < 0:
                raise ValueError(f"{side_name} must be >= 0 or None; got {n}")
            # |j - diag(i)| < S + L always, so a wider side removes nothing: unbounded (this
            # also keeps huge sides from overflowing the kernel's int64 arithmetic).
            sides.append(n if n < S + L else -1)
        window_left, window_right = sides
    softcap_value = 0.0
    if softcap is not None:
        softcap_value = _real_arg(softcap, "softcap")
        if softcap_value <= 0:
            raise ValueError(f"softcap must be positive; got {softcap_value}")

    # The mask: kind and dtype.
    mask = None
    mask_kind = 0
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            mask_kind = 1
        elif _is_float(mask.dtype):
            mask_kind = 2
            mask = _mask_in(mask, acc_dtype)
        else:
            raise TypeError(f"attn_mask must be bool or floating ({_ACCEPTED}); got {mask.dtype}")
        if mask.ndim < 2:
            mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
        if mask.shape[-2] not in (1, L) or mask.shape[-1] not in (1, S):
            raise ValueError(
                f"attn_mask of shape {mask.shape} does not broadcast to (..., L, S) = "
                f"(..., {L}, {S}); query {q.shape}, key {k.shape}"
            )

    # Batch shapes. Kernel layout: (outer..., heads, G, rows, cols) with G the GQA group size,
    # key/value having a size-1 group dim (stride 0).
    mask_batch = mask.shape[:-2] if mask is not None else ()
    if enable_gqa:
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
        groups = hq // hkv if hkv else 1
        if mask_batch and mask_batch[-1] not in (1, hq):
            raise ValueError(
                f"attn_mask of shape {mask.shape} does not broadcast over {hq} query heads "  # type: ignore[union-attr]
            )
        shapes = [("query", q.shape[:-3]), ("key", k.shape[:-3]), ("value", v.shape[:-3])]
        if len(mask_batch) > 1:
            shapes.append(("attn_mask", mask_batch[:-1]))
        outer = _broadcast(shapes, "batch dims (all but the last 3)")
        batch = outer + (hq,)
    else:
        groups = 1
        shapes = [("query", q.shape[:-2]), ("key", k.shape[:-2]), ("value", v.shape[:-2])]
        if mask is not None:
            shapes.append(("attn_mask", mask_batch))
        try:
            batch = _broadcast(shapes, "batch dims (all but the last 2)")
        except ValueError as e:
            if q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
                raise ValueError(f"{e}; for grouped-query attention pass enable_gqa=True") from None
            raise
        outer = batch

    if len(batch) + 1 > _core.max_batch_dims:  # the kernel adds the group dim G
        raise ValueError(f"too many batch dims ({len(batch)}); at most {_core.max_batch_dims - 1}")

    out_shape = batch + (L, Ev)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray; got {type(out).__name__}")
        if out.shape != out_shape or out.dtype.newbyteorder("=") != dtype:
            raise ValueError(
                f"out must have shape {out_shape} and dtype {dtype}; got shape {out.shape} and "
                f"dtype {out.dtype}"
            )
        if not out.flags.writeable:
            raise ValueError("out must be writeable")
        if any(st == 0 and n > 1 for st, n in zip(out.strides, out.shape)):
            raise ValueError(
                f"out must not overlap itself (a zero stride); got strides {out.strides}"
            )

    alibi = None
    if alibi_slopes is not None:
        alibi = _per_head(alibi_slopes, "alibi_slopes", q.shape[:-2], "float")
        if not np.all(np.isfinite(alibi)):
            raise ValueError("alibi_slopes must be finite")
    lengths = None
    if kv_lengths is not None:
        lengths = _per_head(kv_lengths, "kv_lengths", q.shape[:-2], "int")
        if lengths.size and (lengths.min() < 0 or lengths.max() > S):
            raise ValueError(
                f"kv_lengths must lie in [0, S] = [0, {S}]; got values in "
                f"[{lengths.min()}, {lengths.max()}]"
            )

    # Compute into `out` directly unless it is unusable by the kernel or overlaps an input.
    inputs = [a for a in (q, k, v, mask) if a is not None]
    target = out
    if target is None:
        target = np.empty(out_shape, dtype)
    elif (
        not out.dtype.isnative
        or not out.flags.aligned
        or any(np.may_share_memory(out, a) for a in inputs)
    ):
        target = np.empty(out_shape, dtype)
    lse = np.empty(batch + (L,), acc_dtype) if want_lse else None
    weights = np.empty(batch + (L, S), dtype) if want_weights else None

    if any(a is not None and a.size for a in (target, lse, weights)):
        # Lay every operand out as (outer..., heads, G, ...) views and call the core.
        gqa = len(batch) != len(outer)
        kv_batch = outer + (k.shape[-3],) if gqa else batch

        def query_side(a: np.ndarray, core: tuple[int, ...]) -> np.ndarray:
            # (broadcast_to views are read-only: out, lse and weights already have the shape)
            if a.shape != batch + core:
                a = np.broadcast_to(a, batch + core)
            if gqa:
                return _add_group_dim(a, len(core) + 1, groups)
            return np.expand_dims(a, len(batch))

        def key_side(a: np.ndarray, core: tuple[int, ...]) -> np.ndarray:
            return np.expand_dims(
                np.broadcast_to(_native(a, dtype), kv_batch + core), len(kv_batch)
            )

        qv = query_side(_native(q, dtype), (L, E))
        kv = key_side(k, (S, E))
        vv = key_side(v, (S, Ev))
        ov = query_side(target, (L, Ev))
        mv = None if mask is None else query_side(mask, (L, S))
        lv = None if lse is None else query_side(lse, (L,))
        wv = None if weights is None else query_side(weights, (L, S))
        av = None if alibi is None else query_side(alibi, ())
        kl = None if lengths is None else query_side(lengths, ())
        _core.attention(
            qv,
            kv,
            vv,
            ov,
            mv,
            lv,
            av,
            kl,
            wv,
            _DTYPE_CODES[dtype.name],
            mask_kind,
            scale_value,
            softcap_value,
            bool(is_causal),
            alignment == "bottom_right",
            window_left,
            window_right,
        )
    if out is not None and target is not out:
        out[...] = target
    result = out if out is not None else target
    return result, lse, weights
