"""Runtime CPU dispatch, thread settings and build introspection.

Each ISA variant of the kernel is its own extension module (``sdpa._kernel_<isa>``). At import the
best variant that both was built and is supported by the running CPU is activated;
``SDPA_ISA=baseline|avx2|avx512|avx512_bf16`` forces one (an unsupported request is an error).
"""

from __future__ import annotations

import importlib
import importlib.util
import operator
import os
import platform
import sys
import warnings
from typing import Any

from . import _core

# Best first. Each ISA lists the CPU features (as reported by _core.cpu_features) it requires.
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c")
_ISA_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "avx512_bf16": (*_AVX512, "avx512bf16"),
    "avx512": _AVX512,
    "avx2": ("avx2", "fma", "f16c"),
    "baseline": (),
    "generic": (),
}

_active: str | None = None
# More threads than this is a mistake, not a configuration (each one is an OS thread).
_MAX_THREADS = 4096


def _built_isas() -> list[str]:
    return [
        isa
        for isa in _ISA_REQUIREMENTS
        if importlib.util.find_spec(f"sdpa._kernel_{isa}") is not None
    ]


def available_isas() -> list[str]:
    """The kernel variants that were built and that this CPU can run, best first."""
    features = _core.cpu_features()
    return [
        isa for isa in _built_isas() if all(features.get(f, False) for f in _ISA_REQUIREMENTS[isa])
    ]


def set_isa(name: str) -> None:
    """Activate the kernel variant ``name`` (one of :func:`available_isas`)."""
    global _active
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str; got {type(name).__name__}")
    if name not in _ISA_REQUIREMENTS:
        raise ValueError(f"unknown isa {name!r}; known: {', '.join(_ISA_REQUIREMENTS)}")
    avail = available_isas()
    if name not in avail:
        if name not in _built_isas():
            why = "it was not built for this platform"
        else:
            missing = [f for f in _ISA_REQUIREMENTS[name] if not _core.cpu_features().get(f)]
            why = f"this CPU lacks {', '.join(missing)}"
        raise ValueError(f"isa {name!r} is not available: {why}; available: {', '.join(avail)}")
    module = importlib.import_module(f"sdpa._kernel_{name}")
    _core.set_kernel(module.table)
    _active = name


def isa() -> str:
    """The active kernel variant."""
    assert _active is not None
    return _active


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _threads_from_env() -> int:
    text = os.environ.get("SDPA_NUM_THREADS", "").strip()
    if text:
        try:
            n = int(text)
            if n >= 1:
                return n
        except ValueError:
            pass
        warnings.warn(
            f"SDPA_NUM_THREADS={text!r} is not a positive integer; using the default",
            RuntimeWarning,
            stacklevel=3,
        )
    return _default_threads()


def set_num_threads(n: int) -> None:
    """Set how many threads sdpa uses (the caller counts as one)."""
    if isinstance(n, bool):
        raise TypeError("n must be an int; got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int; got {type(n).__name__}") from None
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"n must be between 1 and {_MAX_THREADS}; got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """How many threads sdpa uses."""
    return int(_core.get_num_threads())


def show_config() -> dict[str, Any]:
    """Print and return the build and runtime configuration."""
    from . import __version__

    info = _core.kernel_info() or {}
    import numpy as np

    config: dict[str, Any] = {
        "version": __version__,
        "isa": _active,
        "available_isas": available_isas(),
        "built_isas": _built_isas(),
        "num_threads": get_num_threads(),
        "kernel_build": info.get("compile_info"),
        "binding_build": _core.binding_info,
        "cpu_features": [f for f, on in _core.cpu_features().items() if on],
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    width = max(len(k) for k in config)
    for key, value in config.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        print(f"{key:<{width}}  {value}")
    return config


def _register_threadpoolctl() -> None:
    """Let ``threadpoolctl.threadpool_limits`` control sdpa's pool as it controls BLAS/OpenMP.

    threadpoolctl (>= 3.5) finds a registered controller's library among the loaded shared
    objects by file name and talks to it through C symbols; _core exports
    ``sdpa_get_num_threads`` / ``sdpa_set_num_threads`` for that.
    """
    try:
        import threadpoolctl
    except ImportError:
        return
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return

    class SdpaController(threadpoolctl.LibController):  # type: ignore[misc,name-defined]
        user_api = "sdpa"
        internal_api = "sdpa"
        filename_prefixes = ("_core",)
        check_symbols = ("sdpa_get_num_threads", "sdpa_set_num_threads")

        def get_num_threads(self) -> int:
            return int(self.dynlib.sdpa_get_num_threads())

        def set_num_threads(self, num_threads: int) -> None:
            self.dynlib.sdpa_set_num_threads(int(num_threads))

        def get_version(self) -> str:
            from . import __version__

            return __version__

    threadpoolctl.register(SdpaController)


def _init() -> None:
    requested = os.environ.get("SDPA_ISA", "").strip()
    if requested:
        set_isa(requested)
    else:
        set_isa(available_isas()[0])
    _core.set_num_threads(_threads_from_env())
    _register_threadpoolctl()


_init()
