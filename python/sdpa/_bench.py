"""`python -m sdpa bench`: the project's benchmark suite (never a timed test).

Per shape it prints sdpa's GFLOP/s (4*B*Hq*L*S*E, halved for causal L == S; for a sliding
window, the pairs it attends), that rate as a fraction of the machine's fp32 GEMM rate measured
in the same run (NumPy matmul 2048^3, and PyTorch's when installed), and the speed ratio against
naive NumPy and against PyTorch's CPU scaled_dot_product_attention when PyTorch is installed, and
against ONNX Runtime's Attention op (opset 23) and OpenVINO's scaled_dot_product_attention (f32
precision hint for float32 rows, bf16 for bfloat16 rows) when those are installed. Rows named
-bf16/-fp16 run in bfloat16/float16; -f32q-bf16kv is a float32 query over a bfloat16 cache and
-int8kv a float32 query over a QuantizedKV (8-bit) cache.
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
from dataclasses import asdict, dataclass, field, replace
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
    cache: bool = False  # decode through a KVCache, timed against the same call on its views
    dtype: str = "float32"  # of the query (and of key and value unless kv says otherwise)
    kv: str = ""  # key/value storage when it differs: "bfloat16", "float16" or "int8"

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
    def decode_like(self) -> bool:
        """Few query rows over many keys: the work is reading K and V."""
        return self.L <= 16 and self.S >= 1024

    @property
    def kv_bytes(self) -> float:
        """Bytes of K and V read: 4 (float32), 2 (half) or 1 + 2/32 (int8 with a float16 scale
        per 32) per element."""
        per = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0 + 2 / 32}
        return 2.0 * self.B * self.Hkv * self.S * self.E * per[self.kv or self.dtype]

    @property
    def plain_fp32(self) -> bool:
        return self.dtype == "float32" and not self.kv


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
    Shape("decode-cache", 1, 8, 2, 1, 256, 64, cache=True),  # small: the overhead shows
    Shape("bert-batch-bf16", 8, 12, 12, 512, 512, 64, dtype="bfloat16"),
    Shape("bert-batch-fp16", 8, 12, 12, 512, 512, 64, dtype="float16"),
    Shape("llm-prefill-bf16", 1, 32, 32, 2048, 2048, 128, causal=True, dtype="bfloat16"),
    Shape("llm-prefill-fp16", 1, 32, 32, 2048, 2048, 128, causal=True, dtype="float16"),
    Shape("decode-bf16", 4, 32, 8, 1, 4096, 128, dtype="bfloat16"),
    Shape("decode-fp16", 4, 32, 8, 1, 4096, 128, dtype="float16"),
    Shape("decode-f32q-bf16kv", 4, 32, 8, 1, 4096, 128, kv="bfloat16"),
    Shape("decode-int8kv", 4, 32, 8, 1, 4096, 128, kv="int8"),
]
QUICK = ("seed", "bert", "vit", "gqa-prefill", "decode", "window")


_SETTLE = 0.15  # seconds of quiet before each timed round of _median_times


class Timer:
    """Something to time in rounds: `round(budget)` makes a warm-up call, then timed calls (at
    least one) for about `budget` seconds, and returns their durations."""

    def round(self, budget: float) -> list[float]:
        raise NotImplementedError


class LocalTimer(Timer):
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def round(self, budget: float) -> list[float]:
        times = []
        self.fn()
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self.fn()
            times.append(time.perf_counter() - t0)
            if t0 - start >= budget or len(times) >= 10000:
                return times


def _median_times(timers: dict[str, Timer], budget: float, rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each timer, about `budget` seconds each, measured in
    alternating rounds: on a shared machine, a change of load in mid-run then touches every
    timer alike rather than whichever ran at the time, and their ratio stays meaningful."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            # Let the previous timer's threads finish spinning (OpenBLAS's wait up to ~0.1 s,
            # the OpenMP and sdpa pools' shorter ones) before its warm-up call and timed ones.
            time.sleep(_SETTLE)
            times[name] += timer.round(budget / rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def _median_time(fn: Callable[[], Any], budget: float) -> float:
    return _median_times({"fn": LocalTimer(fn)}, budget, 1)["fn"]


# A server that times one shape in another Python (another build of sdpa) on request, through the
# public API only, so that any two builds can be compared side by side (`--against PYTHON`).
# Requests on stdin, one JSON object a line: {"shape": {...}, "threads": n} sets the shape up;
# {"budget": seconds} times one round and answers with the list of durations.
_SERVER = """
import json, sys, time
import numpy as np, sdpa
fn = None
for line in sys.stdin:
    req = json.loads(line)
    if "shape" in req:
        try:
            d = req["shape"]
            sdpa.set_num_threads(req["threads"])
            rng = np.random.default_rng(0)
            q = rng.standard_normal((d["B"], d["Hq"], d["L"], d["E"]), dtype=np.float32)
            k = rng.standard_normal((d["B"], d["Hkv"], d["S"], d["E"]), dtype=np.float32)
            v = rng.standard_normal((d["B"], d["Hkv"], d["S"], d["E"]), dtype=np.float32)
            kv = d.get("kv") or d.get("dtype", "float32")
            if d.get("dtype", "float32") != "float32":
                import ml_dtypes
                q = q.astype(getattr(ml_dtypes, d["dtype"], None) or d["dtype"])
            if kv == "int8":
                k, v = sdpa.quantize_kv(k), sdpa.quantize_kv(v)
            elif kv != "float32":
                import ml_dtypes
                k, v = (x.astype(getattr(ml_dtypes, kv, None) or kv) for x in (k, v))
            out = None
            kw = {"is_causal": d["causal"], "enable_gqa": d["Hq"] != d["Hkv"], "out": out}
            if d["window"] is not None:
                kw["window"] = tuple(d["window"])
            fn = lambda: sdpa.scaled_dot_product_attention(q, k, v, **kw)
            fn()  # (a build that rejects the row's dtypes says so here)
        except Exception as e:  # a build or environment that cannot run this row: no column
            print(json.dumps({"version": sdpa.__version__, "skip": repr(e)}), flush=True)
            continue
        print(json.dumps({"version": sdpa.__version__}), flush=True)
    else:
        times = []
        fn()
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if t0 - start >= req["budget"] or len(times) >= 10000:
                break
        print(json.dumps(times), flush=True)
"""


class RemoteTimer(Timer):
    """sdpa as installed for another Python interpreter, timed by _SERVER in a subprocess."""

    def __init__(self, python: str) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [python, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the --against interpreter stopped; see its error above")
        return json.loads(answer)

    def set_shape(self, shape: Shape, threads: int) -> str | None:
        """Sets the shape up; its sdpa version, or None when that build cannot run it."""
        answer = self._ask({"shape": asdict(shape), "threads": threads})
        return None if answer.get("skip") else str(answer["version"])

    def round(self, budget: float) -> list[float]:
        return list(self._ask({"budget": budget}))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


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
    """Reading a 512 MiB array with `threads` threads (NumPy reductions, which release the GIL):
    the yardstick for decode, whose work is reading K and V once. A bitwise OR of int64 words:
    a float sum (pairwise, in order) is bound by its adds on some CPUs (on Zen 5, 22 GB/s a
    thread where a plain read takes 33: NOTES section 30), which would overstate every fraction
    of this rate."""
    import threading

    data = np.ones(64 * 2**20, np.int64)
    parts = np.array_split(data, threads)

    def read_all() -> None:
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
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
    """PyTorch's CPU scaled_dot_product_attention in the row's dtype (none for a window or a
    key/value storage that differs from the query's, which it does not take)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if shape.window is not None or shape.kv:
        return None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(dtype[shape.dtype]) for x in (q, k, v))
    kwargs: dict[str, Any] = {"is_causal": shape.causal}
    if shape.Hq != shape.Hkv:
        kwargs["enable_gqa"] = True

    def run() -> Any:
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, **kwargs)

    return run


def _arrays(shape: Shape) -> tuple[Any, ...]:
    """The row's q, k, v in its dtypes (k and v as QuantizedKV for an int8 cache), and their
    float32 originals (what the OpenVINO column is given)."""
    import sdpa

    rng = np.random.default_rng(0)
    q = rng.standard_normal((shape.B, shape.Hq, shape.L, shape.E), dtype=np.float32)
    k = rng.standard_normal((shape.B, shape.Hkv, shape.S, shape.E), dtype=np.float32)
    v = rng.standard_normal((shape.B, shape.Hkv, shape.S, shape.E), dtype=np.float32)
    f32: tuple[np.ndarray, ...] = (q, k, v)

    def as_type(x: np.ndarray, name: str) -> Any:
        if name == "bfloat16":
            import ml_dtypes

            return x.astype(ml_dtypes.bfloat16)
        if name == "int8":
            return sdpa.quantize_kv(x)
        return x.astype(name)

    kv = shape.kv or shape.dtype
    # (the float32 originals rounded to the row's dtype, so that every column computes the same)
    rq, rk, rv = as_type(q, shape.dtype), as_type(k, kv), as_type(v, kv)
    if kv != "int8":
        f32 = tuple(np.asarray(x, np.float32) for x in (rq, rk, rv))
    return rq, rk, rv, f32


def _own_timers(shape: Shape) -> dict[str, Timer]:
    """sdpa itself on the same shape in other storage, in the same rounds, for the ratios the
    half-precision and 8-bit rows are judged by: float32 throughout ("fp32") for every such row,
    and all-bfloat16 ("bf16") for a float32 query over a bfloat16 cache."""
    import sdpa

    timers: dict[str, Timer] = {}
    if shape.plain_fp32:
        return timers
    others = {"fp32": replace(shape, dtype="float32", kv="")}
    if shape.kv == "bfloat16" and shape.dtype == "float32":
        others["bf16"] = replace(shape, dtype="bfloat16", kv="")
    for name, other in others.items():
        q, k, v, _ = _arrays(other)
        kw = {"is_causal": shape.causal, "enable_gqa": shape.Hq != shape.Hkv}
        timers[name] = LocalTimer(
            functools.partial(sdpa.scaled_dot_product_attention, q, k, v, **kw)
        )
    return timers


def _peer_timers(shape: Shape, arrays: tuple[Any, ...], threads: int) -> dict[str, Timer]:
    """ONNX Runtime and OpenVINO on the row, where installed and where they take its dtypes:
    ORT in float32/float16 on the same arrays; OpenVINO on float32 copies with the f32 hint for
    float32 rows and the bf16 hint for bfloat16 rows."""
    from ._peers import openvino_fn, ort_fn

    q, k, v, f32 = arrays
    timers: dict[str, Timer] = {}
    if shape.window is not None or shape.kv:
        return timers
    fn = ort_fn(q, k, v, shape.causal, threads)
    if fn is not None:
        timers["ort"] = LocalTimer(fn)
    hint = {"float32": "f32", "bfloat16": "bf16"}.get(shape.dtype)
    fn = openvino_fn(f32[0], f32[1], f32[2], shape.causal, threads, hint) if hint else None
    if fn is not None:
        timers["ov"] = LocalTimer(fn)
    return timers


@dataclass
class _Context:
    """What every shape of a run is timed with."""

    threads: int
    budget: float
    with_naive: bool
    gemm: Probe
    torch_gemm: Probe | None
    read: Probe
    peers: bool = True  # ONNX Runtime and OpenVINO columns, where installed
    against: RemoteTimer | None = None
    against_version: str | None = None
    full_times: dict[tuple[int, ...], float] = field(default_factory=dict)


def _limit_threads(threads: int) -> tuple[str | None, Any]:
    """sdpa, PyTorch and the BLAS on `threads` threads; returns torch's version and the BLAS
    limits to restore."""
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

        return torch_version, threadpool_limits(limits=threads)
    except ImportError:
        return torch_version, None


def run_suite(
    names: list[str],
    threads: int,
    budget: float,
    with_naive: bool,
    against: str | None = None,
    peers: bool = True,
) -> dict[str, Any]:
    import sdpa

    torch_version, limits = _limit_threads(threads)
    # The yardsticks are timed with every shape, in the same alternating rounds as sdpa, so that
    # each fraction compares rates measured side by side (this machine's load moves).
    remote = RemoteTimer(against) if against else None
    ctx = _Context(threads, budget, with_naive, _gemm_probe(), _torch_gemm_probe(),
                   _read_probe(threads), peers, remote)  # fmt: skip
    rows = []
    for shape in SUITE:
        if shape.name in names:
            rows.append(_measure(shape, ctx))
            _print_row(rows[-1])
            if "cache_overhead_us" in rows[-1]:
                print(
                    f"{'':<12} KVCache.attend: {rows[-1]['cache_overhead_us']:+.1f} us against "
                    f"the same call on its views ({rows[-1]['plain_ms']:.3f} ms)",
                    flush=True,
                )
    if limits is not None:
        limits.restore_original_limits()
    if ctx.against is not None:
        ctx.against.close()
    return {
        "machine": _machine(),
        "threads": threads,
        "isa": sdpa._config.isa(),
        "sdpa_version": sdpa.__version__,
        "torch_version": torch_version,
        "against": against,
        "against_version": ctx.against_version,
        # the yardsticks' medians over the shapes (each row has its own)
        "gemm_gflops": _median_of(rows, "gemm_gflops"),
        "torch_gemm_gflops": _median_of(rows, "torch_gemm_gflops"),
        "read_gbps": _median_of(rows, "read_gbps"),
        "rows": rows,
    }


def _measure(shape: Shape, ctx: _Context) -> dict[str, Any]:
    """Times sdpa, its rivals and the yardsticks on one shape in alternating rounds."""
    import sdpa

    if shape.cache:
        return _measure_cache(shape, ctx)
    arrays = _arrays(shape)
    q, k, v, _ = arrays
    out = np.empty(q.shape[:-1] + (shape.E,), q.dtype)
    kwargs = {"is_causal": shape.causal, "enable_gqa": shape.Hq != shape.Hkv, "out": out}
    if shape.window is not None:
        kwargs["window"] = shape.window
    timers: dict[str, Timer] = {
        "ours": LocalTimer(functools.partial(sdpa.scaled_dot_product_attention, q, k, v, **kwargs)),
        **_yardsticks(ctx, shape.decode_like),
    }
    tfn = _torch_fn(q, k, v, shape) if not shape.kv else None
    if tfn is not None:
        timers["torch"] = LocalTimer(tfn)
    timers.update(_own_timers(shape))
    if ctx.peers:
        timers.update(_peer_timers(shape, arrays, ctx.threads))
    if ctx.against is not None:
        version = ctx.against.set_shape(shape, ctx.threads)
        if version is not None:
            ctx.against_version = version
            timers["against"] = ctx.against
    t = _median_times(timers, ctx.budget)
    if shape.window is not None:  # the speed-up over full attention on the same shape
        full = functools.partial(sdpa.scaled_dot_product_attention, q, k, v, out=out)
        t["full"] = ctx.full_times.get(shape.dims_key) or _median_time(full, ctx.budget)
    elif not shape.causal and shape.plain_fp32:
        ctx.full_times[shape.dims_key] = t["ours"]
    if ctx.with_naive and shape.window is None and shape.plain_fp32:
        t["naive"] = _median_time(functools.partial(_naive, q, k, v, shape), ctx.budget)
    return _row(shape, t, ctx)


def _yardsticks(ctx: _Context, read: bool) -> dict[str, Timer]:
    """The machine's rates timed beside a shape: NumPy's GEMM, PyTorch's where installed, and
    for decode-like shapes the read bandwidth."""
    timers: dict[str, Timer] = {"gemm": LocalTimer(ctx.gemm[0])}
    if ctx.torch_gemm is not None:
        timers["torch_gemm"] = LocalTimer(ctx.torch_gemm[0])
    if read:
        timers["read"] = LocalTimer(ctx.read[0])
    return timers


def _measure_cache(shape: Shape, ctx: _Context) -> dict[str, Any]:
    """A decode step through KVCache.attend against the same call on the cache's filled views
    (what attend adds: the issue's bound is 5 us), with the read-bandwidth yardstick."""
    import sdpa

    rng = np.random.default_rng(0)
    cache = sdpa.KVCache(shape.B, shape.Hkv, shape.S, shape.E)
    kv = rng.standard_normal((shape.B, shape.Hkv, shape.S, shape.E), dtype=np.float32)
    cache.append(kv, kv)
    q = rng.standard_normal((shape.B, shape.Hq, shape.L, shape.E), dtype=np.float32)
    out = np.empty_like(q)
    keys, values, lengths = cache.keys(), cache.values(), cache.lengths[:, None]
    kwargs = {"kv_lengths": lengths, "alignment": "bottom_right", "enable_gqa": True, "out": out}
    same = functools.partial(sdpa.scaled_dot_product_attention, q, keys, values, **kwargs)
    timers: dict[str, Timer] = {
        "ours": LocalTimer(functools.partial(cache.attend, q, out=out)),
        "plain": LocalTimer(same),
        **_yardsticks(ctx, read=True),
    }
    t = _median_times(timers, ctx.budget)
    row = _row(shape, t, ctx)
    row["plain_ms"] = t["plain"] * 1e3
    row["cache_overhead_us"] = (t["ours"] - t["plain"]) * 1e6
    return row


def _row(shape: Shape, t: dict[str, float], ctx: _Context) -> dict[str, Any]:
    """A result row: rates and ratios from the median times `t` (seconds per call)."""
    ours = t["ours"]
    row: dict[str, Any] = {
        "shape": shape.name,
        "dims": asdict(shape),
        "sdpa_ms": ours * 1e3,
        "gflops": shape.flops / ours / 1e9,
        "gemm_gflops": ctx.gemm[1] / t["gemm"] / 1e9,
    }
    row["gemm_fraction"] = row["gflops"] / row["gemm_gflops"]
    if ctx.torch_gemm is not None:
        row["torch_gemm_gflops"] = ctx.torch_gemm[1] / t["torch_gemm"] / 1e9
        row["torch_gemm_fraction"] = row["gflops"] / row["torch_gemm_gflops"]
    if "read" in t:
        row["read_gbps"] = ctx.read[1] / t["read"] / 1e9
        row["kv_gbps"] = shape.kv_bytes / ours / 1e9
        row["bandwidth_fraction"] = row["kv_gbps"] / row["read_gbps"]
    if "full" in t:
        row["vs_full"] = t["full"] / ours
    if "naive" in t:
        row["naive_ms"] = t["naive"] * 1e3
        row["vs_naive"] = t["naive"] / ours
    if "torch" in t:
        row["torch_ms"] = t["torch"] * 1e3
        row["vs_torch"] = t["torch"] / ours
    for peer in ("fp32", "bf16", "ort", "ov", "against"):
        if peer in t:
            row[f"{peer}_ms"] = t[peer] * 1e3
            row[f"vs_{peer}"] = t[peer] / ours
    return row


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
    f"{'shape':<18} {'sdpa ms':>9} {'GFLOP/s':>8} {'of GEMM':>8} {'of tGEMM':>9} {'vs naive':>9} "
    f"{'vs torch':>9} {'vs ORT':>8} {'vs OV':>8} {'KV GB/s':>8} {'of BW':>6} {'vs full':>8} "
    f"{'vs fp32':>8} {'vs base':>8}"
)


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0) + len(suffix)
    return f"{'-':>{width}}" if value is None else format(value, spec) + suffix


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['shape']:<18} {row['sdpa_ms']:>9.3f} {row['gflops']:>8.1f} "
        f"{row['gemm_fraction']:>8.0%} {_fmt(row.get('torch_gemm_fraction'), '>9.0%')} "
        f"{_fmt(row.get('vs_naive'), '>8.2f', 'x')} {_fmt(row.get('vs_torch'), '>8.2f', 'x')} "
        f"{_fmt(row.get('vs_ort'), '>7.2f', 'x')} {_fmt(row.get('vs_ov'), '>7.2f', 'x')} "
        f"{_fmt(row.get('kv_gbps'), '>8.1f')} {_fmt(row.get('bandwidth_fraction'), '>6.0%')} "
        f"{_fmt(row.get('vs_full'), '>7.1f', 'x')} {_fmt(row.get('vs_fp32'), '>7.2f', 'x')} "
        f"{_fmt(row.get('vs_against'), '>7.3f', 'x')}"
        + (f"  (vs all-bf16 {row['vs_bf16']:.2f}x)" if "vs_bf16" in row else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpa bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast subset with short timings")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: sdpa's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--shapes", help="comma-separated shape names to run")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive NumPy timings")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip the ONNX Runtime and OpenVINO columns"
    )
    parser.add_argument(
        "--against",
        metavar="PYTHON",
        help="also time the sdpa installed for another Python interpreter (another build) in the "
        "same alternating rounds; 'vs base' is its time over this build's",
    )
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
    result = run_suite(names, threads, budget, not args.no_naive, args.against, not args.no_peers)
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
