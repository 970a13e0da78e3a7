"""The 8-bit key/value format: llama.cpp's q8_0 values, kept as two NumPy arrays."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["QuantizedKV", "quantize_kv"]

_F16_MAX = float(np.finfo(np.float16).max)


def _check_parts(values: Any, scales: Any, block: Any, name: str) -> None:
    """int8 values, float16 scales of shape values.shape[:-1] + (ceil(D / block),), block >= 1."""
    if (
        not isinstance(values, np.ndarray)
        or not isinstance(scales, np.ndarray)
        or values.dtype != np.int8
        or scales.dtype != np.float16
    ):
        got = [getattr(x, "dtype", type(x).__name__) for x in (values, scales)]
        raise TypeError(f"{name} needs int8 values and float16 scales; got {got[0]} and {got[1]}")
    if not isinstance(block, int) or block < 1 or values.ndim < 1:
        raise ValueError(f"{name}: block must be positive; got {block}")
    want = values.shape[:-1] + (-(-values.shape[-1] // block),)
    if scales.shape != want:
        raise ValueError(
            f"{name}: scales must have shape {want} for values {values.shape} and block "
            f"{block}; got {scales.shape}"
        )


class QuantizedKV:
    """Keys or values stored in 8 bits: int8 values and one float16 scale per block.

    Symmetric, one scale per block of `block` consecutive elements of a row (the last dim), as
    llama.cpp's ``q8_0``: ``x ~ values * scale``, ``scale = max|x| / 127`` over the block, so
    ``|values| <= 127``. A row of D elements has ``ceil(D / block)`` blocks (the last one may be
    short). The values are those of llama.cpp's reference quantizer (``quantize_row_q8_0_ref``:
    ``round(x / scale)`` with halves away from zero, the scale rounded to float16 for storage);
    the layout is two arrays, not its interleaved 34-byte blocks. A block holding a NaN or an
    infinity gets a NaN scale, so it dequantizes to NaN (and reaches, by sdpa's NaN rule, exactly
    the query rows that attend its key).

    Pass one as `key` and one as `value` of :func:`sdpa.scaled_dot_product_attention` or
    :func:`sdpa.varlen_attention`: the kernel reads the int8 values and dequantizes them in
    registers (no dequantized copy is made), and the result equals attention over
    ``key.dequantize()`` and ``value.dequantize()`` within float32 rounding. The result has the
    query's dtype.

    Range: the scales are float16, as in q8_0, so finite values beyond +-8.3e6 (127 x 65504) are
    refused (``ValueError``), and a block whose largest magnitude is below 7.8e-3 (127 x
    float16's smallest normal) gets a subnormal scale with fewer significant bits: its elements
    keep less relative precision (each within 2^-25 x 127 of its value, absolute).

    Attributes
    ----------
    values : ndarray of int8, shape (..., S, D)
    scales : ndarray of float16, shape (..., S, ceil(D / block))
    block : int

    What a KV cache needs
    ---------------------
    - ``QuantizedKV.empty((B, H, capacity, D), block=32)``: an empty cache (zero values, zero
      scales: rows dequantize to 0 until written).
    - ``cache.write(index, rows)``: quantizes float `rows` on the way in and stores them in
      place at ``values[index]`` (NumPy basic indexing that leaves the last dim whole, e.g.
      ``(slice(None), slice(None), slice(pos, pos + n))``).
    - ``cache[:, :, :n]`` (any basic index that leaves the last dim whole): a QuantizedKV whose
      arrays are views of the cache's, never copies, which the kernel accepts as key or value.
    """

    __slots__ = ("block", "scales", "values")

    def __init__(self, values: np.ndarray, scales: np.ndarray, block: int) -> None:
        values, scales = np.asarray(values), np.asarray(scales)
        block = operator.index(block)
        _check_parts(values, scales, block, "QuantizedKV")
        self.values, self.scales, self.block = values, scales, block

    def _check(self, name: str) -> None:
        """Its parts checked again (they are attributes a caller may have replaced); errors name
        `name`, the argument it was passed as."""
        _check_parts(self.values, self.scales, self.block, f"{name} (QuantizedKV)")

    @classmethod
    def empty(cls, shape: tuple[int, ...], *, block: int = 32) -> QuantizedKV:
        """A QuantizedKV of `shape` (e.g. (batch, heads, capacity, head_dim)) that dequantizes to
        zeros until written."""
        shape = tuple(shape)
        values = np.zeros(shape, np.int8)
        scales = np.zeros(shape[:-1] + (-(-shape[-1] // block),), np.float16)
        return cls(values, scales, block)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return int(self.values.ndim)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    def __repr__(self) -> str:
        return f"QuantizedKV(shape={self.shape}, block={self.block})"

    def _index(self, index: Any) -> tuple[Any, ...]:
        """`index` (NumPy's basic indexing of `values`) over every dim; it must leave the last
        dim whole, which the scales do not share."""
        index = index if isinstance(index, tuple) else (index,)
        if any(i is None for i in index):
            raise IndexError("QuantizedKV index: no new axes (None)")
        if any(i is Ellipsis for i in index):
            at = next(n for n, i in enumerate(index) if i is Ellipsis)
            fill = (slice(None),) * (self.ndim - (len(index) - 1))
            index = index[:at] + fill + index[at + 1 :]
        index = index + (slice(None),) * (self.ndim - len(index))
        last = index[-1] if len(index) == self.ndim else None
        if len(index) != self.ndim or last != slice(None):
            raise IndexError(
                f"QuantizedKV index {index!r} must leave the last dim of {self.shape} whole"
            )
        return index

    def __getitem__(self, index: Any) -> QuantizedKV:
        idx = self._index(index)
        return QuantizedKV(self.values[idx], self.scales[idx], self.block)

    def write(self, index: Any, rows: Any) -> None:
        """Quantizes `rows` (floats broadcastable to ``values[index]``) into place at `index`."""
        idx = self._index(index)
        target = self.values[idx].shape
        rows = np.broadcast_to(np.asarray(rows), target)
        q = quantize_kv(rows, block=self.block)
        self.values[idx] = q.values
        self.scales[idx] = q.scales

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        """values * scale of each block, computed in float32 (exact there: an int8 times a
        float16 has 19 significant bits) and returned as `dtype`."""
        scale = np.repeat(self.scales.astype(np.float32), self.block, axis=-1)
        out = self.values.astype(np.float32) * scale[..., : self.values.shape[-1]]
        return out.astype(dtype, copy=False)


def storage_arrays(x: Any) -> tuple[np.ndarray, ...]:
    """The arrays that hold a key-side operand: itself, or a QuantizedKV's values and scales."""
    return (x.values, x.scales) if isinstance(x, QuantizedKV) else (x,)


def quantize_kv(x: Any, *, block: int = 32) -> QuantizedKV:
    """Quantizes float keys or values `x` (..., S, D) to a :class:`QuantizedKV`: one float16
    scale per `block` consecutive elements of each row (llama.cpp's q8_0 reference quantizer)."""
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"quantize_kv: x must be floating; got {a.dtype}")
    block = operator.index(block)
    if block < 1:
        raise ValueError(f"quantize_kv: block must be positive; got {block}")
    if a.ndim < 1:
        raise ValueError("quantize_kv: x must have at least 1 dim")
    D = a.shape[-1]
    nb = -(-D // block)
    pad = np.zeros(a.shape[:-1] + (nb * block,), np.float32)
    pad[..., :D] = a
    blocks = pad.reshape(a.shape[:-1] + (nb, block))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)  # NaN where the block has a NaN
        d = amax / np.float32(127)
        finite = np.isfinite(d)
        inv = np.where((d != 0) & finite, np.float32(1) / np.where(d == 0, 1, d), 0)
        t = (blocks * inv[..., None].astype(np.float32)).astype(np.float64)
        t = np.where(finite[..., None], t, 0.0)  # (a non-finite block: values 0, scale NaN)
    if np.any(finite & (d > _F16_MAX)):
        raise ValueError(
            f"quantize_kv: x holds finite values beyond +-{_F16_MAX * 127:.4g} (127 times "
            f"float16's largest), whose block scales float16 cannot store; max |x| = "
            f"{float(np.max(np.where(finite, amax, 0))):.4g}"
        )
    # C's roundf: halves away from zero (exact in float64 for these magnitudes)
    q = np.where(t >= 0, np.floor(t + 0.5), np.ceil(t - 0.5))
    q = np.clip(q, -127, 127).astype(np.int8).reshape(pad.shape)[..., :D]
    scales = np.where(finite, d, np.nan).astype(np.float16)
    return QuantizedKV(np.ascontiguousarray(q), scales, block)
