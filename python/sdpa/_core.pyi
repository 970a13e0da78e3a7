# Type stubs for the compiled driver/binding module (cpp/bindings/module.cpp).
from typing import Any

import numpy as np

max_batch_dims: int
binding_info: str

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    mask: np.ndarray | None,
    lse: np.ndarray | None,
    alibi: np.ndarray | None,
    kv_length: np.ndarray | None,
    weights: np.ndarray | None,
    dtype: int,
    mask_kind: int,
    scale: float,
    softcap: float,
    causal: bool,
    bottom_right: bool,
    window_left: int,
    window_right: int,
) -> None: ...
def attention_fast(
    query: Any, key: Any, value: Any, out: Any, causal: bool, scale: Any
) -> np.ndarray | None: ...
def set_kernel(table: Any) -> None: ...
def kernel_info() -> dict[str, str] | None: ...
def cpu_features() -> dict[str, bool]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def _set_tiles(row_tile: int, key_block: int) -> None: ...
