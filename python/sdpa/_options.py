"""The options record: every keyword option of an attention call, parsed and checked once.

This is the one place where the options are spelled. Each field of :class:`Options` carries its
parser, its documentation and what it is: a per-head array (``per_head``, laid out by the API and
handed to the kernel by name) or a scalar the kernel reads from the record, and whether the
binding's direct route honours it (``direct``). The functional API, the reference, and everything
built on them (a layer, a cache, Dask) take ``**options`` and build this record; the public
signatures and the parameter sections of their docstrings are generated from it.

Only shape-free checks happen here (types, signs, finiteness); those that need the shapes of the
call (per-head shapes, ``kv_lengths`` against S) happen where the call is laid out.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

ALIGNMENTS = ("top_left", "bottom_right")

# ---- Parsers: (value, name) -> the checked value; TypeError or ValueError naming the argument.


def _flag(x: Any, name: str) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"{name} must be a bool; got {type(x).__name__} {x!r}")


def _real(x: Any, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _scale(x: Any, name: str) -> float | None:
    return None if x is None else _real(x, name)


def _softcap(x: Any, name: str) -> float | None:
    if x is None:
        return None
    value = _real(x, name)
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}")
    return value


def _alignment(x: Any, name: str) -> str:
    if x not in ALIGNMENTS:
        raise ValueError(f"{name} must be 'top_left' or 'bottom_right'; got {x!r}")
    return str(x)


# Positions stay within +-2^48 (offsets are checked against it), so that the kernel's int64
# arithmetic on a diagonal plus or minus a window side never overflows; a window side beyond
# 2^52 removes nothing there and is clamped to it.
POSITION_LIMIT = 2**48
SIDE_LIMIT = 2**52


def _side(x: Any, name: str) -> int | None:
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or None; got bool")
    try:
        n = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int or None; got {type(x).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0 or None; got {n}")
    return min(n, SIDE_LIMIT)


def _window(x: Any, name: str) -> tuple[int | None, int | None] | None:
    if x is None:
        return None
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name} must be a pair (left, right); got {x!r}")
    return _side(x[0], f"{name}[0] (left)"), _side(x[1], f"{name}[1] (right)")


def _out(x: Any, name: str) -> np.ndarray | None:
    if x is not None and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {type(x).__name__}")
    return x


@dataclass(frozen=True)
class PerHead:
    """A per-(batch, head) array option: broadcastable to ``query.shape[:-2]``, handed to the
    kernel in ``dtype`` under its field name, after ``check(values, L, S, name)`` passed."""

    dtype: type
    check: Callable[[np.ndarray, int, int, str], None] = lambda a, L, S, name: None

    def parse(self, x: Any, name: str) -> np.ndarray | None:
        if x is None:
            return None
        a = np.asarray(x)
        integral = np.issubdtype(self.dtype, np.integer)
        ok = (
            a.dtype.kind in "iu"
            if integral
            else a.dtype.kind in "fiu" or a.dtype.name == "bfloat16"
        )
        if not ok:
            what = "an integer" if integral else "a real"
            raise TypeError(f"{name} must have {what} dtype; got {a.dtype}")
        return a


def _finite(a: np.ndarray, L: int, S: int, name: str) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")


def _in_range(a: np.ndarray, what: str, n: int, name: str) -> None:
    if a.size and (a.min() < 0 or a.max() > n):
        raise ValueError(
            f"{name} must lie in [0, {what}] = [0, {n}]; got values in [{a.min()}, {a.max()}]"
        )


def _key_count(a: np.ndarray, L: int, S: int, name: str) -> None:
    _in_range(a, "S", S, name)


def _query_count(a: np.ndarray, L: int, S: int, name: str) -> None:
    _in_range(a, "L", L, name)


def _position(a: np.ndarray, L: int, S: int, name: str) -> None:
    if a.size and np.max(np.abs(a)) > POSITION_LIMIT:
        raise ValueError(f"{name} must lie within +-2**48; got values up to {np.max(np.abs(a))}")


def _option(
    default: Any,
    parse: Callable[[Any, str], Any] | PerHead,
    doc: str,
    *,
    direct: bool = False,
) -> Any:
    per_head = parse if isinstance(parse, PerHead) else None
    meta = {"parse": per_head.parse if per_head else parse, "doc": doc, "direct": direct}
    return field(default=default, metadata={**meta, "per_head": per_head})


@dataclass(frozen=True, eq=False)
class Options:
    """The options of one attention call, checked (see the module docstring)."""

    is_causal: bool = _option(
        False,
        _flag,
        """Query i attends only keys j <= diag(i) (see `alignment`). Combines with `attn_mask`.""",
        direct=True,
    )
    scale: float | None = _option(
        None,
        _scale,
        """Multiplies ``q @ k^T``; default ``1 / sqrt(E)`` (1 when E == 0). Must be finite.""",
        direct=True,
    )
    enable_gqa: bool = _option(
        False,
        _flag,
        """Grouped-query attention: dim -3 of query (Hq) may be a multiple of dim -3 of key and
value (Hkv); query head h uses key/value head ``h // (Hq // Hkv)``. Nothing is copied.""",
        direct=True,
    )
    out: np.ndarray | None = _option(
        None,
        _out,
        """Receives the result; must have the result's shape and dtype.""",
        direct=True,
    )
    alignment: str = _option(
        "top_left",
        _alignment,
        """Where the diagonal of the L x S score matrix sits: diag(i) = i ("top_left", PyTorch's
``is_causal``) or i + S - L ("bottom_right", FlashAttention's convention, for KV-cache
decoding and chunked prefill). Applies to `is_causal`, `window` and `alibi_slopes`.""",
    )
    window: tuple[int | None, int | None] | None = _option(
        None,
        _window,
        """``(left, right)``: query i attends key j only if ``diag(i) - left <= j <= diag(i) +
right``; None on a side means unbounded. ``is_causal=True`` is the same as ``right = 0``.""",
    )
    alibi_slopes: np.ndarray | None = _option(
        None,
        PerHead(np.float64, _finite),
        """Array broadcastable to ``query.shape[:-2]``: adds ``-slope * |j - diag(i)|`` to the
scores.""",
    )
    softcap: float | None = _option(
        None,
        _softcap,
        """Positive; scores become ``softcap * tanh(scores / softcap)`` after scaling and before
any mask or ALiBi is added.""",
    )
    kv_lengths: np.ndarray | None = _option(
        None,
        PerHead(np.int64, _key_count),
        """Integer array broadcastable to ``query.shape[:-2]``: keys ``j >= length`` are removed
(padded batches). Each length lies in [0, S]. With ``alignment="bottom_right"`` each row's
diagonal is ``i + len_k - len_q`` (FlashAttention's rule for ragged batches).""",
    )
    q_lengths: np.ndarray | None = _option(
        None,
        PerHead(np.int64, _query_count),
        """Integer array broadcastable to ``query.shape[:-2]``: query rows ``i >= length`` are
padding, and give output 0 and lse -inf. Each length lies in [0, L]. With
``alignment="bottom_right"`` it is the ``len_q`` of the diagonal ``i + len_k - len_q``.""",
    )
    sinks: np.ndarray | None = _option(
        None,
        PerHead(np.float64, _finite),
        """Array broadcastable to ``query.shape[:-2]``, one logit per head (attention sinks, as in
gpt-oss): adds ``exp(sink)`` to each row's softmax denominator without contributing a value.
Not scaled, capped or biased. The lse includes it: ``log(exp(sink) + sum_j exp(s_j))``; a row
with no key gets output 0 and lse = sink.""",
    )
    q_offset: np.ndarray | None = _option(
        None,
        PerHead(np.int64, _position),
        """Integer array broadcastable to ``query.shape[:-2]``: the position of query row 0, for
a call over a chunk of a longer sequence. Causal, windows and ALiBi compare positions, so query i
at ``q_offset + i`` and key j at ``kv_offset + j`` relate as in the full call: its diagonal is
``i + q_offset - kv_offset`` (plus ``len_k - len_q`` with ``alignment="bottom_right"``).""",
    )
    kv_offset: np.ndarray | None = _option(
        None,
        PerHead(np.int64, _position),
        """Integer array broadcastable to ``query.shape[:-2]``: the position of key row 0 (see
`q_offset`).""",
    )
    return_lse: bool = _option(
        False,
        _flag,
        """Also return the log-sum-exp of the scores over the keys that remain, shape (..., L),
float64 for float64 results and float32 otherwise (-inf for a row with no key).""",
    )

    @classmethod
    def parse(
        cls, options: Mapping[str, Any], *, exclude: Iterable[str] = (), where: str = "attention"
    ) -> Options:
        """The record of the keyword options `options` (a TypeError names an unknown one)."""
        known = _NAMES.difference(exclude)
        for name in options:
            if name not in known:
                raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")
        return cls(**{name: _PARSERS[name](value, name) for name, value in options.items()})


_FIELDS = {f.name: f for f in fields(Options)}
_NAMES = frozenset(_FIELDS)
_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    n: f.metadata["parse"] for n, f in _FIELDS.items()
}

# The options the binding's direct route honours (any other sends a call down the general path).
DIRECT = frozenset(n for n, f in _FIELDS.items() if f.metadata["direct"])
# The per-head array options, each with its PerHead spec.
PER_HEAD: dict[str, PerHead] = {
    n: f.metadata["per_head"] for n, f in _FIELDS.items() if f.metadata["per_head"]
}


def default_of(name: str) -> Any:
    return _FIELDS[name].default


def takes_options(*, exclude: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Any]:
    """Decorates a function ``f(*positional, **options)``: its signature shows the options
    (keyword-only, with their defaults) and ``{options}`` in its docstring becomes their
    documentation, both generated from :class:`Options` less `exclude`."""
    skip = set(exclude)

    def decorate(func: Callable[..., Any]) -> Any:
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        names = [n for n in _FIELDS if n not in skip]
        params += [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default_of(n))
            for n in names
        ]
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        if func.__doc__:
            func.__doc__ = func.__doc__.replace("{options}", _document(names))
        return func

    return decorate


def _document(names: list[str]) -> str:
    lines = []
    for name in names:
        f = _FIELDS[name]
        lines.append(f"    {name} : optional, default {f.default!r}")
        lines += [f"        {line}" for line in f.metadata["doc"].splitlines()]
    return "\n".join(lines).lstrip()
