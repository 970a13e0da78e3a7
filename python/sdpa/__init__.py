"""sdpa: fast, flash-style scaled dot-product attention for NumPy on the CPU.

>>> import numpy as np, sdpa
>>> q = k = v = np.ones((2, 4, 8), np.float32)
>>> sdpa.scaled_dot_product_attention(q, k, v).shape
(2, 4, 8)
"""

try:
    from . import _core  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "sdpa's compiled extension (sdpa._core) could not be imported. Install sdpa with "
        "`pip install .` from the source tree (an editable or source-tree import has no compiled "
        f"modules). Original error: {e}"
    ) from e

from . import reference
from ._cache import KVCache
from ._config import get_num_threads, set_num_threads, show_config
from ._layer import MultiheadAttention
from ._merge import merge_attention
from ._quant import QuantizedKV, quantize_kv
from ._varlen import varlen_attention
from ._version import __version__
from .api import attention_weights, scaled_dot_product_attention

__all__ = [
    "KVCache",
    "MultiheadAttention",
    "QuantizedKV",
    "__version__",
    "attention_weights",
    "get_num_threads",
    "merge_attention",
    "quantize_kv",
    "reference",
    "scaled_dot_product_attention",
    "set_num_threads",
    "show_config",
    "varlen_attention",
]


def __dir__() -> list[str]:
    """The public names only (PEP 562): not the submodules the imports above bind."""
    return sorted(__all__)
