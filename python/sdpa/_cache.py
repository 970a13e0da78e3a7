"""A key/value cache for decoding: preallocated buffers, ragged lengths, no copy per step."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._quant import QuantizedKV, storage_arrays
from .api import scaled_dot_product_attention

__all__ = ["KVCache"]

# What attend() sets itself: the cache's keys are its own, each sequence's diagonal sits at its
# own length, and its query rows are the newest tokens.
_SET_BY_CACHE = ("kv_lengths", "alignment", "enable_gqa")


class KVCache:
    """Preallocated keys and values of a batch of sequences, for decoding token by token.

    Parameters
    ----------
    batch, num_kv_heads, capacity, head_dim : int
        The buffers are ``keys (batch, num_kv_heads, capacity, head_dim)`` and ``values (batch,
        num_kv_heads, capacity, value_dim)``.
    dtype : dtype, default float32
        Storage type of the buffers: float16, bfloat16, float32, float64, or ``"int8"``, an
        8-bit cache (:class:`sdpa.QuantizedKV`, llama.cpp's q8_0 layout: a float16 scale per
        `block` elements of a row): appended rows are quantized on the way in, and ``attend``
        reads the int8 values directly (a quarter of float32's bytes, plus the scales).
    window : int, optional
        A rolling buffer for sliding-window models: each query attends its last `window` tokens,
        itself included (``window=(window - 1, 0)`` for ``attend``), so older tokens may go.
        When a sequence would outgrow ``capacity``, its last ``window - 1`` tokens move to the
        front of its buffer (positions are relative, so nothing else changes); ``capacity`` must
        be at least ``window - 1`` plus the longest chunk appended at once. Without `window`,
        outgrowing ``capacity`` is a ``ValueError``.
    value_dim : int, optional
        The values' last dim (default ``head_dim``).
    block : int, default 32
        Elements per scale of an int8 cache (ignored for float ones).

    Attributes
    ----------
    lengths : ndarray of int64, shape (batch,)
        Tokens held per sequence (``keys()``/``values()`` hold ``lengths.max()`` rows).
    seen : ndarray of int64, shape (batch,)
        Tokens appended per sequence since the start, dropped ones included (the position of the
        next token, e.g. for rotary embeddings).
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: Any = np.float32,
        window: int | None = None,
        value_dim: int | None = None,
        block: int = 32,
    ) -> None:
        value_dim = head_dim if value_dim is None else value_dim
        sizes = {"batch": batch, "num_kv_heads": num_kv_heads, "capacity": capacity,
                 "head_dim": head_dim, "value_dim": value_dim}  # fmt: skip
        for name, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a non-negative int; got {n!r}")
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be a positive int or None; got {window!r}")
        if window is not None and capacity < window:
            raise ValueError(f"capacity ({capacity}) must be at least window ({window})")
        dtype = np.dtype(dtype)
        if dtype.name not in ("float16", "bfloat16", "float32", "float64", "int8"):
            raise TypeError(
                f"dtype must be float16, bfloat16, float32, float64 or int8; got {dtype}"
            )
        shape = (batch, num_kv_heads, capacity)
        self._k: np.ndarray | QuantizedKV
        self._v: np.ndarray | QuantizedKV
        if dtype == np.int8:
            if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
                raise ValueError(f"block must be a positive int; got {block!r}")
            self._k = QuantizedKV.empty(shape + (head_dim,), block=int(block))
            self._v = QuantizedKV.empty(shape + (value_dim,), block=int(block))
        else:
            self._k = np.zeros(shape + (head_dim,), dtype)
            self._v = np.zeros(shape + (value_dim,), dtype)
        self.window = None if window is None else int(window)
        self.lengths = np.zeros(batch, np.int64)
        self.seen = np.zeros(batch, np.int64)
        self._held = 0  # lengths.max(), kept up to date (NumPy's max costs a microsecond)

    @property
    def capacity(self) -> int:
        return int(self._k.shape[2])

    @property
    def dtype(self) -> np.dtype:
        """The storage type (int8 for an 8-bit cache)."""
        k = self._k
        return np.dtype(np.int8) if isinstance(k, QuantizedKV) else k.dtype

    def keys(self) -> Any:
        """The filled part of the keys, a view: (batch, num_kv_heads, held, head_dim), held being
        lengths.max() (shorter sequences hold padding past their length); a QuantizedKV of views
        for an int8 cache."""
        return self._k[:, :, : self._held]

    def values(self) -> Any:
        """The filled part of the values, a view: (batch, num_kv_heads, held, value_dim)."""
        return self._v[:, :, : self._held]

    def _store(self, index: tuple[Any, ...], k: np.ndarray, v: np.ndarray) -> None:
        """Writes rows k and v at `index` (quantizing them for an int8 cache)."""
        for buf, rows in ((self._k, k), (self._v, v)):
            if isinstance(buf, QuantizedKV):
                buf.write(index, rows)
            else:
                buf[index] = rows

    def reset(self) -> None:
        """Empties every sequence (the buffers stay allocated)."""
        self.lengths[:] = 0
        self.seen[:] = 0
        self._held = 0

    def append(self, key: Any, value: Any, *, lengths: Any = None) -> None:
        """Writes new tokens after each sequence's last, in place.

        Parameters
        ----------
        key : array_like, shape (batch, num_kv_heads, T, head_dim)
        value : array_like, shape (batch, num_kv_heads, T, value_dim)
        lengths : array_like of int, shape (batch,), optional
            How many of the T new tokens are real for each sequence (ragged batches: the first
            ``lengths[b]``, the rest being padding); default T for every sequence.
        """
        k, v, n = self._check_new(key, value, lengths)
        if np.all(n == 0):
            return
        self._make_room(n)
        start = self.lengths
        if np.all(n == n[0]) and np.all(start == start[0]):  # the common case: one slice
            a, t = int(start[0]), int(n[0])
            self._store((slice(None), slice(None), slice(a, a + t)), k[:, :, :t], v[:, :, :t])
        else:
            for b in np.nonzero(n)[0]:
                a, t = int(start[b]), int(n[b])
                self._store((b, slice(None), slice(a, a + t)), k[b, :, :t], v[b, :, :t])
        self.lengths += n
        self.seen += n
        self._held = int(self.lengths.max(initial=0))

    def attend(self, query: Any, *, q_lengths: Any = None, **options: Any) -> Any:
        """Attention of the newest tokens' queries over the cache (decode or chunked prefill).

        Parameters
        ----------
        query : array_like, shape (batch, num_heads, T, E)
            The queries of the tokens appended last: the T newest (T = 1 to decode). num_heads is
            a multiple of num_kv_heads (grouped-query attention).
        q_lengths : array_like of int, shape (batch,), optional
            How many of the T query rows are real per sequence (the rest are padding: output 0);
            as passed to ``append(..., lengths=)``.
        **options
            Those of :func:`sdpa.scaled_dot_product_attention` (``is_causal``, ``window``,
            ``alibi_slopes``, ``softcap``, ``sinks``, ``scale``, ``return_lse``, ``out`` ...),
            except what the cache sets: each sequence's keys and lengths, and FlashAttention's
            per-sequence bottom-right diagonal (query i of a sequence holding len_k tokens, with
            len_q new queries, has diagonal i + len_k - len_q). A rolling cache applies its
            window unless a narrower one is given.
        """
        for name in _SET_BY_CACHE:
            if name in options:
                raise TypeError(f"KVCache.attend() sets {name} itself")
        q = np.asarray(query)
        if q.ndim != 4 or q.shape[0] != self.lengths.shape[0]:
            raise ValueError(
                f"query must be (batch, num_heads, T, E) with batch = {self.lengths.shape[0]}; "
                f"got {q.shape}"
            )
        self._apply_window(options)
        kwargs: dict[str, Any] = {"kv_lengths": self.lengths[:, None], "alignment": "bottom_right"}
        if q_lengths is not None:
            n = np.asarray(q_lengths)
            if n.shape != self.lengths.shape or n.dtype.kind not in "iu":
                raise ValueError(
                    f"q_lengths must be {self.lengths.shape[0]} ints, one per sequence; got {n!r}"
                )
            kwargs["q_lengths"] = n[:, None]
        if q.shape[1] != self._k.shape[1]:
            kwargs["enable_gqa"] = True
        return scaled_dot_product_attention(q, self.keys(), self.values(), **kwargs, **options)

    def _apply_window(self, options: dict[str, Any]) -> None:
        """A rolling cache keeps only the last `window` tokens: its queries may look no further."""
        if self.window is None:
            return
        left = self.window - 1
        given = options.get("window")
        if given is None:
            options["window"] = (left, 0)
        elif given[0] is None or given[0] > left:
            raise ValueError(
                f"this cache keeps only the last {self.window} tokens of each sequence; a window "
                f"reaching further back ({given}) would miss dropped ones"
            )

    def _check_new(self, key: Any, value: Any, lengths: Any) -> tuple[np.ndarray, ...]:
        k, v = np.asarray(key), np.asarray(value)
        batch, heads, _, dim = self._k.shape
        if k.ndim != 4 or k.shape[:2] != (batch, heads) or k.shape[3] != dim:
            raise ValueError(
                f"key must be (batch, num_kv_heads, T, head_dim) = ({batch}, {heads}, T, {dim}); "
                f"got {k.shape}"
            )
        if v.shape != k.shape[:3] + (self._v.shape[3],):
            raise ValueError(
                f"value must be {k.shape[:3] + (self._v.shape[3],)} (key {k.shape}); got {v.shape}"
            )
        T = k.shape[2]
        n = np.full(batch, T, np.int64) if lengths is None else np.asarray(lengths)
        if n.dtype.kind not in "iu" or n.shape != (batch,):
            raise ValueError(f"lengths must be {batch} ints; got {n!r}")
        if np.any(n < 0) or np.any(n > T):
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}]; got {n.tolist()}")
        return k, v, n.astype(np.int64)

    def _make_room(self, n: np.ndarray) -> None:
        """Makes room for n new tokens per sequence: a ValueError without a window, else each
        overflowing sequence keeps its last window - 1 tokens, moved to the front."""
        over = self.lengths + n > self.capacity
        if not np.any(over):
            return
        if self.window is None:
            b = int(np.argmax(over))
            raise ValueError(
                f"appending {int(n[b])} tokens to sequence {b}, which holds {int(self.lengths[b])},"
                f" would exceed the capacity ({self.capacity}); make a bigger cache or give it a "
                f"window"
            )
        keep = self.window - 1
        if np.any(n[over] + keep > self.capacity):
            raise ValueError(
                f"a chunk of {int(n.max())} tokens does not fit a rolling cache of capacity "
                f"{self.capacity} that keeps {keep} tokens; use chunks of at most "
                f"{self.capacity - keep}"
            )
        for seq in np.nonzero(over)[0]:
            held = int(self.lengths[seq])
            drop = held - min(keep, held)
            for buf in (self._k, self._v):  # (an int8 cache moves values and scales as they are)
                for a in storage_arrays(buf):
                    a[seq, :, : held - drop] = a[seq, :, drop:held].copy()
            self.lengths[seq] = held - drop  # (held - drop <= keep)
        self._held = int(self.lengths.max(initial=0))
