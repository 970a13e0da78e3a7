"""``sdpa`` as an attention backend of Hugging Face transformers (5.0 or newer).

::

    import sdpa.integrations.transformers as sdpa_hf
    name = sdpa_hf.register()                                   # "sdpa_numpy"
    model = AutoModel.from_pretrained(path, attn_implementation=name)

Every attention call of the model then runs through :func:`sdpa.scaled_dot_product_attention`
on zero-copy NumPy views of the model's CPU tensors, and writes straight into the
``(B, Tq, H, Dv)`` tensor the model expects. What the model asks for is mapped as follows.

- **Causal**: with no mask, ``is_causal`` (the call's keyword, else ``module.is_causal``) for
  more than one query, top-left aligned, as transformers' own "sdpa" backend does (it only
  leaves the mask out when that alignment is right).
- **Padding, sliding window, chunked and packed sequences**: transformers' boolean mask
  (True = attend), built by its ``sdpa_mask``, which :func:`register` registers under the same
  name. The window comes from the model's config through that mask: the cache decides the key
  positions (a static sliding-window cache is a rolling buffer), so the mask is the only safe
  source. Rows left with no key (left-padded query positions) give 0, not NaN. A mask that
  only pads keys on the right (a padded encoder batch) becomes ``kv_lengths``, so that the
  kernel skips the padded key blocks.
- **GQA / MQA**: ``enable_gqa`` when the key has fewer heads; no key or value is repeated.
  For one query token (decode) the query heads of each key/value head become its query rows
  (views both ways; transformers' ``pack_gqa``), which the kernel runs several times faster.
- **Sinks** (gpt-oss ``s_aux``): ``sinks=``, one unscaled logit per query head.
- **Soft-capping** (Gemma 2 ``softcap``): ``softcap=``, applied before the mask, as in eager.
- **Relative position bias** (T5's ``position_bias``): an additive float mask.
- **dtypes**: float32, float16, float64 and bfloat16 (read through ``ml_dtypes``, zero copy).
- **output_attentions=True**: the probabilities from :func:`sdpa.attention_weights` (a second
  pass over the scores).

Not supported: dropout > 0 (``ValueError``: call ``model.eval()``) and gradients (the forward
pass works with gradients enabled, ``backward`` raises ``RuntimeError``). Tensors must be on
the CPU.

**The name.** transformers treats an implementation name containing "sdpa" as a variant of
its own "sdpa" backend and refuses it for models that declare ``_supports_sdpa = False``
(gpt-oss, Gemma 2, among others): loading them with the default name raises ``ValueError``.
For those, register a neutral name as well, e.g. ``register("numpy_attention")``. Avoid
"flash" too (transformers then takes the backend for FlashAttention and tries to import it).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .. import api

__all__ = ["DEFAULT_NAME", "attention_forward", "register"]

DEFAULT_NAME = "sdpa_numpy"

_INSTALL = (
    'pip install "sdpa[transformers]", and PyTorch (its CPU build is enough; sdpa does not '
    "declare it, so that pip never replaces the build you chose)"
)
# Substrings that make transformers treat a name as one of its own backends, or parse it.
_FORBIDDEN = ("flash", "flex_attention", "|", "/", ":")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"sdpa.integrations.transformers needs PyTorch: {_INSTALL}.") from e
    return torch


def _import_transformers() -> Any:
    _import_torch()
    try:
        import transformers
        from transformers import masking_utils
    except ImportError as e:
        raise ImportError(
            f"sdpa.integrations.transformers needs transformers >= 5.0: {_INSTALL}."
        ) from e
    major = int(transformers.__version__.split(".")[0])
    if major < 5 or not hasattr(masking_utils, "AttentionMaskInterface"):
        raise ImportError(
            f"sdpa.integrations.transformers needs transformers >= 5.0 (found "
            f"{transformers.__version__}, whose BERT does not use AttentionInterface): {_INSTALL}."
        )
    return transformers


def register(name: str = DEFAULT_NAME) -> str:
    """Register ``sdpa`` with transformers' attention and mask interfaces under `name`.

    After it, ``from_pretrained(..., attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``) runs every attention call of a model through
    :func:`attention_forward`. Registering is global to the process and may be repeated.

    Parameters
    ----------
    name : str, default "sdpa_numpy"
        The implementation name. A name containing "sdpa" is checked by transformers like its
        own "sdpa" backend: models with ``_supports_sdpa = False`` (gpt-oss, Gemma 2, ...)
        refuse it with ``ValueError``. For them, pass a neutral name such as
        ``"numpy_attention"``; the same function serves both names.

    Returns
    -------
    str
        `name`, to pass as ``attn_implementation``.

    Raises
    ------
    ImportError
        transformers (>= 5.0) or PyTorch is missing.
    ValueError
        `name` is one of transformers' own backends ("eager", "sdpa", ...), or contains
        "flash", "flex_attention", "|", "/" or ":", which transformers would parse as one.
    """
    transformers = _import_transformers()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    interface = transformers.AttentionInterface
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, not {name!r}")
    current = interface._global_mapping.get(name)
    if name == "eager" or (current is not None and current is not attention_forward):
        raise ValueError(f"{name!r} is already an attention implementation of transformers")
    bad = [s for s in _FORBIDDEN if s in name]
    if bad:
        raise ValueError(
            f"name {name!r} contains {bad[0]!r}, which transformers reads as a backend of its "
            "own; choose a neutral name such as 'numpy_attention'"
        )
    interface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _numpy(torch: Any, tensor: Any) -> Any:
    """A NumPy view of a CPU tensor's memory (no copy); bfloat16 is read through ml_dtypes."""
    tensor = tensor.detach()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    try:
        import ml_dtypes
    except ImportError as e:
        raise ImportError(
            f'bfloat16 models need ml_dtypes: pip install "sdpa[transformers]" ({e})'
        ) from e
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _check(torch: Any, query: Any, key: Any, value: Any, dropout: float) -> None:
    if dropout:
        raise ValueError(
            f"sdpa has no attention dropout (the model asked for dropout={dropout}): "
            "call model.eval() for inference, or train with another attn_implementation"
        )
    for label, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_cpu:
            raise ValueError(f"sdpa computes on the CPU; {label} is on {t.device}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value differ in dtype ({query.dtype}, {key.dtype}, {value.dtype})"
        )
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"sdpa does not compute in {query.dtype}")


def _options(
    torch: Any, module: Any, query: Any, key: Any, mask: Any, scaling: Any, kwargs: dict
) -> dict[str, Any]:
    """The keyword options of the sdpa call, from what the model passed (see the module doc)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    options: dict[str, Any] = {
        # Top-left, as torch's is_causal: transformers leaves the mask out only where it is right.
        "is_causal": bool(causal) and query.shape[2] > 1 and mask is None,
        "scale": None if scaling is None else float(scaling),
        "enable_gqa": query.shape[1] != key.shape[1],
    }
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        options["sinks"] = _numpy(torch, sinks.detach().to(torch.float32))
    return options


def _mask(torch: Any, mask: Any, bias: Any, dtype: Any) -> Any:
    """The mask as NumPy: transformers' bool (True = attend) or float mask, plus any bias."""
    if bias is None:
        return None if mask is None else _numpy(torch, mask)
    # a bias is added in the computation's precision: float64 for float64 models, else float32
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bias = _numpy(torch, bias.detach().to(dtype))
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return np.where(_numpy(torch, mask), bias, bias.dtype.type(-np.inf))
    return bias + _numpy(torch, mask.detach().to(dtype))


def _key_lengths(mask: Any) -> Any:
    """(B, 1) key counts when a bool (B, 1, Tq, Tk) mask only pads keys on the right (every row
    is ``j < length``, as a padded encoder batch's is), else None. The kernel then skips the
    padded key blocks instead of reading the mask: same result, less work."""
    if mask is None or mask.dtype != np.bool_ or mask.ndim != 4 or mask.shape[1] != 1:
        return None
    row = mask[:, :, :1]
    lengths = row.sum(axis=-1, dtype=np.int64)  # (B, 1, 1)
    if not (row == (np.arange(mask.shape[-1]) < lengths[..., None])).all():
        return None
    return lengths[:, :, 0] if (mask == row).all() else None


def _attend(torch: Any, query: Any, key: Any, value: Any, mask: Any, options: dict) -> Any:
    """Run the kernel on views of query/key/value; write a new (B, Tq, Hq, Dv) tensor."""
    (_, hq, tq, _), hkv = query.shape, key.shape[1]
    batch = max(query.shape[0], key.shape[0], 1 if mask is None else mask.shape[0])
    out = torch.empty((batch, tq, hq, value.shape[-1]), dtype=query.dtype)
    q, o = _numpy(torch, query), _numpy(torch, out)
    shared_mask = mask is None or mask.ndim < 3 or mask.shape[-3] == 1
    if tq == 1 and hq != hkv and hq % hkv == 0 and shared_mask and "sinks" not in options:
        # Decode with GQA: the query heads that share a key/value head become that head's query
        # rows, a view both ways (transformers' pack_gqa); several times faster than L = 1.
        q = q.reshape(q.shape[0], hkv, hq // hkv, q.shape[-1])
        o = o.reshape(batch, hkv, hq // hkv, o.shape[-1])
        options = {**options, "enable_gqa": False}
    else:  # the kernel writes (B, Hq, Tq, Dv) into the (B, Tq, Hq, Dv) buffer, transposed
        o = o.transpose(0, 2, 1, 3)
    api.scaled_dot_product_attention(
        q, _numpy(torch, key), _numpy(torch, value), mask, out=o, **options
    )
    return out


def _weights(torch: Any, query: Any, key: Any, mask: Any, options: dict) -> Any:
    """The attention probabilities (B, Hq, Tq, Tk), for ``output_attentions=True``."""
    weights = api.attention_weights(
        _numpy(torch, query), _numpy(torch, key), attn_mask=mask, **options
    )
    if query.dtype == torch.bfloat16:
        return torch.from_numpy(weights.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(weights)


@functools.cache
def _no_backward() -> Any:
    """An autograd Function around the forward pass whose backward raises."""
    function: Any = _import_torch().autograd.Function

    class SdpaAttention(function):
        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any, run: Any) -> Any:
            return run()

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            raise RuntimeError(
                "sdpa's attention has no backward pass: train with attn_implementation='sdpa' "
                "or 'eager', then switch with model.set_attn_implementation(name)"
            )

    return SdpaAttention


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """The attention function :func:`register` registers (transformers' calling convention).

    Parameters
    ----------
    module : torch.nn.Module
        The model's attention module (read for ``is_causal``).
    query : torch.Tensor, shape (B, Hq, Tq, D)
    key : torch.Tensor, shape (B, Hkv, Tk, D)
    value : torch.Tensor, shape (B, Hkv, Tk, Dv)
        CPU tensors of one dtype (float16, bfloat16, float32, float64), any strides; Hq is a
        multiple of Hkv. They are read in place, never copied.
    attention_mask : torch.Tensor or None, broadcastable to (B, Hq, Tq, Tk)
        Boolean (True = attend) as transformers' ``sdpa_mask`` builds it, or an additive float
        mask; None means causal (top-left) or no mask, as for torch's "sdpa".
    scaling : float, optional
        The score scale; default ``D ** -0.5``.
    dropout : float, default 0.0
        Must be 0: sdpa has no dropout (``ValueError`` otherwise).
    **kwargs
        Read: ``is_causal``, ``softcap``, ``s_aux`` (sinks), ``position_bias`` and
        ``output_attentions``; the rest (position ids, cache details, ``sliding_window``, whose
        window the mask already holds) are not needed.

    Returns
    -------
    attn_output : torch.Tensor, shape (B, Tq, Hq, Dv)
        A new C-contiguous tensor of the query's dtype.
    attn_weights : torch.Tensor, shape (B, Hq, Tq, Tk), or None
        Only with ``output_attentions=True`` (computed by :func:`sdpa.attention_weights`).
    """
    torch = _import_torch()
    _check(torch, query, key, value, dropout)
    options = _options(torch, module, query, key, attention_mask, scaling, kwargs)
    mask = _mask(torch, attention_mask, kwargs.get("position_bias"), query.dtype)
    lengths = _key_lengths(mask)
    if lengths is not None:
        options["kv_lengths"], mask = lengths, None
    run = functools.partial(_attend, torch, query, key, value, mask, options)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _no_backward().apply(query, key, value, run)
    else:
        out = run()
    weights = None
    if kwargs.get("output_attentions"):
        weights = _weights(torch, query, key, mask, options)
    return out, weights
