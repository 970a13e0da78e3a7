"""`python -m sdpa bench`: the project's benchmark suite (never a timed test).

Per shape it prints sdpa's GFLOP/s (4*B*Hq*L*S*E, halved for causal L == S; for a sliding
window, the pairs it attends), that rate as a fraction of the machine's fp32 GEMM rate measured
in the same run (NumPy matmul 2048^3, and PyTorch's when installed), and the speed ratio against
naive NumPy and against PyTorch's CPU scaled_dot_product_attention when PyTorch is installed.
Decode-like shapes also report the K/V read bandwidth and its fraction of the machine's read
bandwidth (same thread count) measured in the same run; the sliding-window shape reports its
speed-up over full attention on the same shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    E: int
    causal: bool = False
    window: tuple[int | None, int | None] | None = None

    @property
    def flops(self) -> float:
        """Useful work: 4*B*Hq*E per attended (query, key) pair; L*S pairs, halved for causal
        L == S, and for a window the pairs it leaves (top-left diagonal)."""
        pairs = float(self.L * self.S)
        if self.window is not None:
            left, right = (self.S if w is None else w for w in self.window)
            i = np.arange(self.L)
            pairs = float(np.sum(np.minimum(i + right, self.S - 1) - np.maximum(i - left, 0) + 1))
        elif self.causal and self.L == self.S:
            pairs /= 2
        return 4.0 * self.B * self.Hq * self.E * pairs

    @property
    def dims_key(self) -> tuple[int, ...]:
        return (self.B, self.Hq, self.Hkv, self.L, self.S, self.E)

    @property
    def kv_bytes(self) -> float:
        return 2.0 * self.B * self.Hkv * self.S * self.E * 4


SUITE = [
    Shape("seed", 1, 1, 1, 3, 3, 3),
    Shape("bert", 1, 12, 12, 128, 128, 64),
    Shape("bert-batch", 8, 12, 12, 512, 512, 64),
    Shape("vit", 16, 12, 12, 197, 197, 64),
    Shape("llm-prefill", 1, 32, 32, 2048, 2048, 128, causal=True),
    Shape("gqa-prefill", 1, 32, 8, 2048, 2048, 128, causal=True),
    Shape("long", 1, 8, 8, 8192, 8192, 64),
    Shape("decode", 4, 32, 8, 1, 4096, 128),
    Shape("window", 1, 8, 8, 8192, 8192, 64, window=(256, 0)),
]
QUICK = ("seed", "bert", "vit", "gqa-prefill", "decode", "window")


_SETTLE = 0.15  # seconds of quiet before each timed round of _median_times


def _median_times(fns: list[Callable[[], Any]], budget: float, rounds: int = 5) -> list[float]:
    """Median seconds per call of each fn (at least one call a round), about `budget` seconds
    each, measured in alternating rounds: on a shared machine, a change of load in mid-run then
    touches every fn alike rather than whichever ran at the time, and their ratio stays
    meaningful."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            # Let the previous fn's threads finish spinning (OpenBLAS's wait up to ~0.1 s, the
            # OpenMP and sdpa pools' shorter ones) before a warm-up call and the timed ones.
            time.sleep(_SETTLE)
            fn()
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
                if t0 - start >= budget / rounds or len(t) >= 10000:
                    break
    return [statistics.median(t) for t in times]


Probe = tuple[Callable[[], Any], float]  # a call, and the work (flops or bytes) it does


def _gemm_probe() -> Probe:
    """The machine's fp32 GEMM through NumPy (its BLAS): a 2048^3 matmul."""
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n**3


def _torch_gemm_probe() -> Probe | None:
    """The same GEMM through PyTorch (MKL/oneDNN), often faster than NumPy's BLAS."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * 2048**3


def _read_probe(threads: int) -> Probe:
    """Reading a 512 MiB array with `threads` threads (NumPy sums, which release the GIL): the
    yardstick for decode, whose work is reading K and V once."""
    import threading

    data = np.ones(128 * 2**20, np.float32)
    parts = np.array_split(data, threads)

    def read_all() -> None:
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return read_all, float(data.nbytes)


def _naive(q: np.ndarray, k: np.ndarray, v: np.ndarray, shape: Shape) -> np.ndarray:
    """Textbook NumPy attention: the full L x S matrix, as a user would write it."""
    g = shape.Hq // shape.Hkv
    if g > 1:
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * np.float32(1.0 / math.sqrt(shape.E))
    if shape.causal:
        s = np.where(np.tri(shape.L, shape.S, shape.S - shape.L, dtype=bool), s, -np.inf)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


def _torch_fn(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, shape: Shape
) -> Callable[[], Any] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if shape.window is not None:
        return None
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    kwargs: dict[str, Any] = {"is_causal": shape.causal}
    if shape.Hq != shape.Hkv:
        kwargs["enable_gqa"] = True

    def run() -> Any:
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, **kwargs)

    return run


def run_suite(names: list[str], threads: int, budget: float, with_naive: bool) -> dict[str, Any]:
    import sdpa

    sdpa.set_num_threads(threads)
    torch_version = None
    try:
        import torch

        torch.set_num_threads(threads)
        torch_version = torch.__version__
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        limits: Any = threadpool_limits(limits=threads)
    except ImportError:
        limits = None

    # The yardsticks are timed with every shape, in the same alternating rounds as sdpa, so that
    # each fraction compares rates measured side by side (this machine's load moves).
    gemm_probe = _gemm_probe()
    torch_gemm_probe = _torch_gemm_probe()
    read_probe = _read_probe(threads)
    rows = []
    full_times: dict[tuple[int, ...], float] = {}
    rng = np.random.default_rng(0)
    for shape in SUITE:
        if shape.name not in names:
            continue
        q = rng.standard_normal((shape.B, shape.Hq, shape.L, shape.E), dtype=np.float32)
        k = rng.standard_normal((shape.B, shape.Hkv, shape.S, shape.E), dtype=np.float32)
        v = rng.standard_normal((shape.B, shape.Hkv, shape.S, shape.E), dtype=np.float32)
        out = np.empty_like(q)
        gqa = shape.Hq != shape.Hkv

        def ours(q=q, k=k, v=v, out=out, shape=shape, gqa=gqa) -> Any:
            return sdpa.scaled_dot_product_attention(
                q, k, v, is_causal=shape.causal, enable_gqa=gqa, out=out, window=shape.window
            )

        # sdpa, PyTorch and the yardsticks, timed in alternating rounds.
        timed: dict[str, Callable[[], Any]] = {"ours": ours, "gemm": gemm_probe[0]}
        tfn = _torch_fn(q, k, v, shape)
        if tfn is not None:
            timed["torch"] = tfn
        if torch_gemm_probe is not None:
            timed["torch_gemm"] = torch_gemm_probe[0]
        if shape.L <= 16 and shape.S >= 1024:  # decode-like: the work is reading K and V
            timed["read"] = read_probe[0]
        t = dict(zip(timed, _median_times(list(timed.values()), budget)))
        t_ours = t["ours"]
        row: dict[str, Any] = {
            "shape": shape.name,
            "dims": asdict(shape),
            "sdpa_ms": t_ours * 1e3,
            "gflops": shape.flops / t_ours / 1e9,
            "gemm_gflops": gemm_probe[1] / t["gemm"] / 1e9,
        }
        row["gemm_fraction"] = row["gflops"] / row["gemm_gflops"]
        if torch_gemm_probe is not None:
            row["torch_gemm_gflops"] = torch_gemm_probe[1] / t["torch_gemm"] / 1e9
            row["torch_gemm_fraction"] = row["gflops"] / row["torch_gemm_gflops"]
        if "read" in t:
            row["read_gbps"] = read_probe[1] / t["read"] / 1e9
            row["kv_gbps"] = shape.kv_bytes / t_ours / 1e9
            row["bandwidth_fraction"] = row["kv_gbps"] / row["read_gbps"]
        if shape.window is not None:  # the speed-up over full attention on the same shape
            full = functools.partial(sdpa.scaled_dot_product_attention, q, k, v, out=out)
            t_full = full_times.get(shape.dims_key) or _median_times([full], budget, 1)[0]
            row["vs_full"] = t_full / t_ours
        elif not shape.causal:
            full_times[shape.dims_key] = t_ours
        if with_naive and shape.window is None:
            naive = functools.partial(_naive, q, k, v, shape)
            t_naive = _median_times([naive], budget, 1)[0]
            row["naive_ms"] = t_naive * 1e3
            row["vs_naive"] = t_naive / t_ours
        if "torch" in t:
            row["torch_ms"] = t["torch"] * 1e3
            row["vs_torch"] = t["torch"] / t_ours
        rows.append(row)
        _print_row(row)
    if limits is not None:
        limits.restore_original_limits()
    return {
        "machine": _machine(),
        "threads": threads,
        "isa": sdpa._config.isa(),
        "sdpa_version": sdpa.__version__,
        "torch_version": torch_version,
        # the yardsticks' medians over the shapes (each row has its own)
        "gemm_gflops": _median_of(rows, "gemm_gflops"),
        "torch_gemm_gflops": _median_of(rows, "torch_gemm_gflops"),
        "read_gbps": _median_of(rows, "read_gbps"),
        "rows": rows,
    }


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = _values(rows, key)
    return statistics.median(values) if values else None


def _range_of(rows: list[dict[str, Any]], key: str, unit: str) -> str:
    values = _values(rows, key)
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.1f} {unit}" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}-{hi:.1f} {unit}"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


_HEADER = (
    f"{'shape':<12} {'sdpa ms':>9} {'GFLOP/s':>8} {'of GEMM':>8} {'of tGEMM':>9} {'vs naive':>9} "
    f"{'vs torch':>9} {'KV GB/s':>8} {'of BW':>6} {'vs full':>8}"
)


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0) + len(suffix)
    return f"{'-':>{width}}" if value is None else format(value, spec) + suffix


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['shape']:<12} {row['sdpa_ms']:>9.3f} {row['gflops']:>8.1f} "
        f"{row['gemm_fraction']:>8.0%} {_fmt(row.get('torch_gemm_fraction'), '>9.0%')} "
        f"{_fmt(row.get('vs_naive'), '>8.2f', 'x')} {_fmt(row.get('vs_torch'), '>8.2f', 'x')} "
        f"{_fmt(row.get('kv_gbps'), '>8.1f')} {_fmt(row.get('bandwidth_fraction'), '>6.0%')} "
        f"{_fmt(row.get('vs_full'), '>7.1f', 'x')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpa bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast subset with short timings")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: sdpa's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--shapes", help="comma-separated shape names to run")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive NumPy timings")
    args = parser.parse_args(argv)

    import sdpa

    threads = args.threads or sdpa.get_num_threads()
    names = [s.name for s in SUITE]
    if args.shapes:
        names = [n.strip() for n in args.shapes.split(",")]
        unknown = sorted(set(names) - {s.name for s in SUITE})
        if unknown:
            valid = ", ".join(s.name for s in SUITE)
            parser.error(f"unknown shapes: {', '.join(unknown)} (valid: {valid})")
    elif args.quick:
        names = list(QUICK)
    budget = 0.3 if args.quick else 1.5
    print(
        f"sdpa {sdpa.__version__} bench: {_machine()}; {threads} threads; isa {sdpa._config.isa()}"
    )
    print(_HEADER, flush=True)
    result = run_suite(names, threads, budget, with_naive=not args.no_naive)
    rows = result["rows"]
    print(
        "yardsticks, timed with each shape: fp32 GEMM 2048^3 through NumPy "
        f"{_range_of(rows, 'gemm_gflops', 'GFLOP/s')} ('of GEMM'), through PyTorch "
        f"{_range_of(rows, 'torch_gemm_gflops', 'GFLOP/s')} ('of tGEMM'); read bandwidth "
        f"{_range_of(rows, 'read_gbps', 'GB/s')} ('of BW'); "
        f"torch {result['torch_version'] or 'absent'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
