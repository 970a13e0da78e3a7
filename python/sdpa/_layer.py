"""The self-attention layer: projections, head split and merge, and the kernel between them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._cache import KVCache
from ._options import Options
from .api import attention_weights, scaled_dot_product_attention

__all__ = ["MultiheadAttention"]

# What the layer sets or does not take from the options of the functional API.
_LAYER_SETS = ("enable_gqa", "out", "return_lse")
_PARAMS = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


class MultiheadAttention:
    """Multi-head (and grouped-query) attention with its projections, on NumPy arrays.

    Parameters are NumPy arrays in the ``x @ W`` convention: ``w_q (embed_dim, num_heads *
    head_dim)``, ``w_k (kdim, num_kv_heads * head_dim)``, ``w_v (vdim, num_kv_heads *
    head_dim)``, ``w_o (num_heads * head_dim, embed_dim)`` and biases ``b_q``, ``b_k``, ``b_v``,
    ``b_o`` (None without `bias`). They start as PyTorch's ``nn.MultiheadAttention`` starts
    (Xavier-uniform projections, PyTorch's Linear init for the output, zero biases), drawn from
    `rng`; ``load_state_dict`` loads trained ones.

    Parameters
    ----------
    embed_dim, num_heads : int
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); a divisor of `num_heads` (default: it).
    head_dim : int, optional
        Default ``embed_dim // num_heads``.
    kdim, vdim : int, optional
        The key and value inputs' feature dims (default `embed_dim`), for cross-attention.
    bias : bool, default True
    dtype : dtype, default float32
    rng : numpy.random.Generator or int, optional
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dtype: Any = np.float32,
        rng: Any = None,
    ) -> None:
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else int(num_kv_heads)
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                f"({num_kv_heads})"
            )
        if head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or give "
                f"head_dim"
            )
        self.head_dim = self.embed_dim // self.num_heads if head_dim is None else int(head_dim)
        self.kdim = self.embed_dim if kdim is None else int(kdim)
        self.vdim = self.embed_dim if vdim is None else int(vdim)
        self.dtype = np.dtype(dtype)
        self.bias = bool(bias)
        self._init_parameters(np.random.default_rng(rng))

    # ---- parameters ---------------------------------------------------------------------------

    @property
    def _sizes(self) -> tuple[int, int]:
        return self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

    def _init_parameters(self, rng: np.random.Generator) -> None:
        """PyTorch's initialisation: Xavier-uniform over the packed (q, k, v) projection when the
        three share their input size (over each otherwise), its Linear init (uniform with bound
        1 / sqrt(fan_in)) for the output, zero biases."""
        hq, hkv = self._sizes
        e = self.embed_dim

        def uniform(bound: float, shape: tuple[int, int]) -> np.ndarray:
            return rng.uniform(-bound, bound, shape).astype(self.dtype)

        if self.kdim == e and self.vdim == e:
            packed = uniform(math.sqrt(6.0 / (e + hq + 2 * hkv)), (e, hq + 2 * hkv))
            self.w_q, self.w_k, self.w_v = np.split(packed, [hq, hq + hkv], axis=1)
        else:
            self.w_q = uniform(math.sqrt(6.0 / (e + hq)), (e, hq))
            self.w_k = uniform(math.sqrt(6.0 / (self.kdim + hkv)), (self.kdim, hkv))
            self.w_v = uniform(math.sqrt(6.0 / (self.vdim + hkv)), (self.vdim, hkv))
        self.w_o = uniform(1.0 / math.sqrt(hq), (hq, e))
        zeros = (lambda n: np.zeros(n, self.dtype)) if self.bias else (lambda n: None)
        self.b_q, self.b_k, self.b_v, self.b_o = zeros(hq), zeros(hkv), zeros(hkv), zeros(e)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads trained parameters, from PyTorch's ``nn.MultiheadAttention`` names
        (``in_proj_weight``, ``in_proj_bias``, ``q_proj_weight``, ``k_proj_weight``,
        ``v_proj_weight``, ``out_proj.weight``, ``out_proj.bias``) or Hugging Face's
        (``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``, ``o_proj.weight`` or
        ``out_proj.weight``, and their ``.bias``). Weights stored (out, in), as both store them,
        are transposed. Arrays, or anything NumPy can read (torch CPU tensors too)."""
        loaded = _from_state(state, self._sizes[0])
        for name, value in loaded.items():
            current = getattr(self, name)
            if current is None:
                raise ValueError(f"{name} given, but this layer was made with bias=False")
            if value.shape != current.shape:
                raise ValueError(f"{name} must have shape {current.shape}; got {value.shape}")
        missing = [n for n in _PARAMS if getattr(self, n) is not None and n not in loaded]
        if missing:
            raise ValueError(f"the state dict lacks {', '.join(missing)} (got {sorted(state)})")
        for name, value in loaded.items():
            setattr(self, name, value.astype(self.dtype))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under PyTorch's ``nn.MultiheadAttention`` names, (out, in) weights:
        ``in_proj_weight`` when q, k and v share sizes, else ``q/k/v_proj_weight``."""
        state = {}
        if self.w_q.shape == self.w_k.shape == self.w_v.shape:
            state["in_proj_weight"] = np.concatenate([self.w_q, self.w_k, self.w_v], axis=1).T
        else:
            for x in "qkv":
                state[f"{x}_proj_weight"] = getattr(self, f"w_{x}").T
        if self.bias:
            state["in_proj_bias"] = np.concatenate([self.b_q, self.b_k, self.b_v])
            state["out_proj.bias"] = self.b_o
        state["out_proj.weight"] = self.w_o.T
        return {k: np.ascontiguousarray(v) for k, v in state.items()}

    # ---- the forward pass ----------------------------------------------------------------------

    def __call__(
        self,
        query: Any,
        key: Any = None,
        value: Any = None,
        *,
        attn_mask: Any = None,
        is_causal: bool = False,
        kv_lengths: Any = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        **variants: Any,
    ) -> Any:
        """The layer's output, ``(..., T, embed_dim)``, and with `need_weights` the attention
        weights ``(..., num_heads, T, S)``.

        `query` is ``(..., T, embed_dim)``; `key` and `value` are ``(..., S, kdim)`` and ``(...,
        S, vdim)`` for cross-attention, both None for self-attention (then one matrix product
        computes the three projections). With `cache`, the new keys and values are appended to
        it and the queries attend everything it holds (decode or chunked prefill; `kv_lengths`
        does not apply). Every option of :func:`sdpa.scaled_dot_product_attention` passes
        through `variants` (``window``, ``alibi_slopes``, ``softcap``, ``sinks``, ``scale``...).
        """
        options: dict[str, Any] = {"is_causal": is_causal, **variants}
        Options.parse(options, exclude=_LAYER_SETS, where="MultiheadAttention")
        q, k, v = self._project(query, key, value)
        if cache is not None:
            k, v = self._through_cache(cache, k, v, options, kv_lengths, attn_mask)
        elif kv_lengths is not None:
            options["kv_lengths"] = kv_lengths
        if self.num_heads != self.num_kv_heads:
            options["enable_gqa"] = True
        # The merged heads (..., T, H, D) are written through their (..., H, T, D) view: no copy.
        batch = np.broadcast_shapes(
            q.shape[:-3], k.shape[:-3], v.shape[:-3], _mask_batch(attn_mask)
        )
        merged = np.empty(batch + (q.shape[-2], self.num_heads, v.shape[-1]), q.dtype)
        scaled_dot_product_attention(q, k, v, attn_mask, out=np.swapaxes(merged, -2, -3), **options)
        out = merged.reshape(merged.shape[:-2] + (-1,)) @ self.w_o
        if self.b_o is not None:
            out += self.b_o
        if not need_weights:
            return out
        options.pop("is_causal")
        return out, attention_weights(q, k, attn_mask=attn_mask, is_causal=is_causal, **options)

    @staticmethod
    def _through_cache(
        cache: KVCache, k: np.ndarray, v: np.ndarray, options: dict[str, Any], kv_lengths: Any,
        attn_mask: Any,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Appends the new keys and values (only each sequence's real ones, with q_lengths) and
        returns the cache's; the queries then attend them bottom-right aligned."""
        if kv_lengths is not None or attn_mask is not None or "alignment" in options:
            raise ValueError(
                "with a cache, the queries attend what it holds, bottom-right aligned: no "
                "kv_lengths, attn_mask or alignment"
            )
        lengths = None
        if options.get("q_lengths") is not None:
            q_lengths = np.broadcast_to(np.asarray(options["q_lengths"]), k.shape[:-3] + (1,))
            lengths = q_lengths.reshape(len(q_lengths), -1)[:, 0]  # (one per sequence)
        cache.append(k, v, lengths=lengths)
        options.update(kv_lengths=cache.lengths[:, None], alignment="bottom_right")
        return cache.keys(), cache.values()

    def _project(self, query: Any, key: Any, value: Any) -> tuple[np.ndarray, ...]:
        """q (..., Hq, T, D), k and v (..., Hkv, S, D): projections split into heads as views."""
        x = np.asarray(query, self.dtype)
        if x.ndim < 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (..., T, embed_dim={self.embed_dim}); got {x.shape}")
        hq, hkv = self._sizes
        if key is None and value is None:  # self-attention: one product for q, k and v
            w = np.concatenate([self.w_q, self.w_k, self.w_v], axis=1)
            qkv = x @ w
            if self.bias:
                qkv += np.concatenate([self.b_q, self.b_k, self.b_v])
            q, k, v = qkv[..., :hq], qkv[..., hq : hq + hkv], qkv[..., hq + hkv :]
        elif key is None or value is None:
            raise ValueError(
                "give both key and value (cross-attention) or neither (self-attention)"
            )
        else:
            q = self._linear(x, self.w_q, self.b_q)
            k = self._linear(self._input(key, "key", self.kdim), self.w_k, self.b_k)
            v = self._linear(self._input(value, "value", self.vdim), self.w_v, self.b_v)
        return (
            self._heads(q, self.num_heads),
            self._heads(k, self.num_kv_heads),
            self._heads(v, self.num_kv_heads),
        )

    def _input(self, x: Any, name: str, dim: int) -> np.ndarray:
        a = np.asarray(x, self.dtype)
        if a.ndim < 2 or a.shape[-1] != dim:
            raise ValueError(f"{name} must be (..., S, {dim}); got {a.shape}")
        return a

    @staticmethod
    def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        y = x @ w
        if b is not None:
            y += b
        return y

    def _heads(self, x: np.ndarray, heads: int) -> np.ndarray:
        """(..., T, heads * D) -> (..., heads, T, D), a strided view."""
        return np.swapaxes(x.reshape(x.shape[:-1] + (heads, self.head_dim)), -2, -3)


def _mask_batch(mask: Any) -> tuple[int, ...]:
    """The dims of a mask (..., H, T, S) before the heads: they broadcast with the batch."""
    shape = np.shape(mask) if mask is not None else ()
    return tuple(shape[:-3]) if len(shape) > 3 else ()


def _from_state(state: Mapping[str, Any], hq: int) -> dict[str, np.ndarray]:
    """The layer's parameters (x @ W convention) from PyTorch's or Hugging Face's names."""
    a = {name: np.asarray(value) for name, value in state.items()}
    out: dict[str, np.ndarray] = {}
    if "in_proj_weight" in a:  # PyTorch, packed (q, k, v) rows
        w = a["in_proj_weight"].T
        hkv = (w.shape[1] - hq) // 2
        out["w_q"], out["w_k"], out["w_v"] = w[:, :hq], w[:, hq : hq + hkv], w[:, hq + hkv :]
    for x in "qkv":
        for name in (f"{x}_proj_weight", f"{x}_proj.weight"):  # PyTorch separate, Hugging Face
            if name in a:
                out[f"w_{x}"] = a[name].T
        if f"{x}_proj.bias" in a:
            out[f"b_{x}"] = a[f"{x}_proj.bias"]
    if "in_proj_bias" in a:
        b = a["in_proj_bias"]
        hkv = (b.shape[0] - hq) // 2
        out["b_q"], out["b_k"], out["b_v"] = b[:hq], b[hq : hq + hkv], b[hq + hkv :]
    for prefix in ("out_proj", "o_proj"):
        if f"{prefix}.weight" in a:
            out["w_o"] = a[f"{prefix}.weight"].T
        if f"{prefix}.bias" in a:
            out["b_o"] = a[f"{prefix}.bias"]
    unknown = set(a) - _KNOWN_NAMES
    if unknown:
        raise ValueError(f"unknown parameter names: {', '.join(sorted(unknown))}")
    return out


_KNOWN_NAMES = frozenset(
    ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "o_proj.weight",
     "o_proj.bias"]
    + [f"{x}_proj_weight" for x in "qkv"]
    + [f"{x}_proj.{p}" for x in "qkv" for p in ("weight", "bias")]
)  # fmt: skip
