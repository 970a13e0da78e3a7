"""sdpa.dask on a LocalCluster against the single-process call (issue 13; benchmarks/NOTES.md).

    pip install "sdpa[dask]"
    python benchmarks/dask_bench.py                  # 1 x 8 x 65,536 x 64 causal, 3 rounds
    python benchmarks/dask_bench.py --memory-run     # also: a 2M-token sliding window, 512 MiB
    python benchmarks/dask_bench.py --tokens 8192 --rounds 1 --memory-tokens 262144   # quick

Part 1, overhead: a long causal prefill (float32, 1 x heads x tokens x dim) computed by
``sdpa.scaled_dot_product_attention`` in this process on 2 threads, and by
``sdpa.dask.scaled_dot_product_attention`` on a LocalCluster of 2 worker processes x 1 thread
(each task then runs 1 sdpa thread), with the inputs already in the workers' memory, in two
layouts: chunks of one head (no merge) and blocks of ``--block`` tokens along L and S (the
causal half of the block pairs, merged). Rounds alternate the three, so each ratio compares
times taken side by side. Times: the result in the workers' memory (persist), then that result
gathered into this process as one NumPy array (the rest of a ``compute``). Each worker's peak
memory (VmHWM, reset before each run) is reported with its resident memory before the run.

Part 2, ``--memory-run``: a sequence too long for one worker (memory_limit 512 MiB each; its keys
alone are 512 MiB at 2M tokens x 64) under a causal sliding window, q, k and v generated on the
workers block by block and each output row reduced to its squared norm, so nothing the size of
the sequence is ever held. It reports the time, each worker's peak memory, and checks three
query blocks against single calls over the keys they see (with q_offset/kv_offset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

import sdpa
import sdpa.dask as sdask

MIB = 1 << 20


def reset_peak() -> None:
    """(On a worker) reset this process's peak resident memory, VmHWM (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_mib() -> dict[str, float]:
    """(On a worker) resident and peak resident memory of this process, MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cluster(memory_limit: str = "auto") -> LocalCluster:
    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit=memory_limit,
    )


def warm_up(client: Client) -> None:
    x = da.ones((1, 2, 256, 16), chunks=(1, 1, 128, 16), dtype=np.float32)
    client.compute(sdask.scaled_dot_product_attention(x, x, x, is_causal=True), sync=True)


def single_run(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[dict, np.ndarray]:
    t, cpu = time.perf_counter(), cpu_seconds()
    out = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    run = {"total_s": time.perf_counter() - t, "cpu_s": cpu_seconds() - cpu}
    return run, out


def cluster_run(client: Client, inputs: list, want: np.ndarray | None) -> dict:
    """One causal call on persisted inputs: persist time, gather time, memory, error."""
    out = sdask.scaled_dot_product_attention(*inputs, is_causal=True)
    layer = out.dask.layers[out.name]
    calls = sum(1 for task in layer.values() if task[0] is sdask._attend)
    before = client.run(memory_mib)
    client.run(reset_peak)
    cpu = sum(client.run(cpu_seconds).values()) + cpu_seconds()  # (this process: the scheduler)
    t0 = time.perf_counter()
    out = client.persist(out)
    wait(out)
    t1 = time.perf_counter()
    cpu = sum(client.run(cpu_seconds).values()) + cpu_seconds() - cpu
    result = out.compute()
    t2 = time.perf_counter()
    peaks = client.run(memory_mib)
    run = {
        "persist_s": t1 - t0,
        "gather_s": t2 - t1,
        "total_s": t2 - t0,
        "cpu_s": cpu,
        "kernel_calls": calls,
        "tasks": len(layer),
        "rss_before_mib": [round(m["VmRSS"]) for m in before.values()],
        "peak_mib": [round(m["VmHWM"]) for m in peaks.values()],
    }
    if want is not None:
        run["max_rel_err"] = float(np.max(np.abs(result - want)) / np.max(np.abs(want)))
    del out, result
    return run


def overhead(args: argparse.Namespace) -> dict:
    shape = (1, args.heads, args.tokens, args.dim)
    sdpa.set_num_threads(2)
    runs: dict[str, list] = {"single": [], "heads": [], "blocks": []}
    with cluster() as c, Client(c) as client:
        warm_up(client)
        # q, k, v generated on the workers in blocks, a copy cut by heads, and one in this process
        rng = da.random.default_rng(0)
        blocks = (1, args.heads, args.block, args.dim)
        xs = [rng.standard_normal(shape, dtype=np.float32, chunks=blocks) for _ in range(3)]
        persisted = {"blocks": client.persist(xs)}
        wait(persisted["blocks"])
        heads = (1, 1, args.tokens, args.dim)
        persisted["heads"] = client.persist([x.rechunk(heads) for x in persisted["blocks"]])
        wait(persisted["heads"])
        q, k, v = client.compute(persisted["blocks"], sync=True)
        want = None
        for r in range(args.rounds):
            run, out = single_run(q, k, v)
            runs["single"].append({**run, "load": os.getloadavg()[0]})
            want = out if want is None else want
            for name in ("heads", "blocks"):
                runs[name].append(cluster_run(client, persisted[name], want if r == 0 else None))
            print(json.dumps({n: rs[-1] for n, rs in runs.items()}), flush=True)
    return runs


def summarize(runs: dict) -> None:
    """Medians, and the medians of the ratios taken round by round (side by side)."""
    single = runs["single"]
    wall = statistics.median(r["total_s"] for r in single)
    cpu = statistics.median(r["cpu_s"] for r in single)
    loads = [round(r["load"], 1) for r in single]
    print(f"\nsingle process, 2 threads: median {wall:.2f} s, CPU {cpu:.1f} s; load {loads}")
    for name in ("heads", "blocks"):
        rs = runs[name]

        def ratio(key: str, rs: list = rs) -> float:
            base = "cpu_s" if key == "cpu_s" else "total_s"
            return statistics.median(r[key] / s[base] for r, s in zip(rs, single)) - 1

        added = [max(p - b for p, b in zip(r["peak_mib"], r["rss_before_mib"])) for r in rs]
        print(
            f"LocalCluster 2x1, {name}: {rs[0]['kernel_calls']} kernel calls, {rs[0]['tasks']} "
            f"tasks. Persist median {statistics.median(r['persist_s'] for r in rs):.2f} s, "
            f"with the gather {statistics.median(r['total_s'] for r in rs):.2f} s; by round: "
            f"persist {ratio('persist_s'):+.1%}, with the gather {ratio('total_s'):+.1%}, CPU "
            f"{ratio('cpu_s'):+.1%}. Worker peaks {rs[0]['peak_mib']} MiB, resident before "
            f"{rs[0]['rss_before_mib']} MiB (a run adds at most {max(added)} MiB); max rel err "
            f"{rs[0].get('max_rel_err', float('nan')):.1e}"
        )


def check_blocks(q, k, v, norms: np.ndarray, block: int, window: int) -> float:
    """The largest relative error of three query blocks' squared row norms against single calls
    over the keys they see (q, k, v: the Dask arrays, recomputed here block by block)."""
    worst = 0.0
    n = q.shape[2] // block
    for i in (0, n // 2, n - 1):
        a, b = i * block, (i + 1) * block
        ka = max(0, a - window)
        qb, kb, vb = da.compute(q[:, :, a:b], k[:, :, ka:b], v[:, :, ka:b], scheduler="threads")
        want = sdpa.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, window=(window, 0), q_offset=a, kv_offset=ka
        )
        want = (want * want).sum(axis=-1, dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(norms[..., a:b] - want) / np.max(want))))
    return worst


def windowed_norms(tokens: int, block: int, window: int):
    """Squared output row norms of a causal sliding window over generated q, k, v (1 head)."""
    rng = da.random.default_rng(1)
    shape, chunks = (1, 1, tokens, 64), (1, 1, block, 64)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32, chunks=chunks) for _ in range(3))
    out = sdask.scaled_dot_product_attention(q, k, v, is_causal=True, window=(window, 0))
    return (q, k, v), (out * out).sum(axis=-1, dtype=np.float64)


def memory_run(args: argparse.Namespace) -> dict:
    """A sequence too long for one worker, sharded; and the same in one chunk (it fails)."""
    tokens, block, window = args.memory_tokens, args.memory_block, args.window
    result: dict = {"tokens": tokens, "block": block, "window": window, "limit": "512MiB"}
    with cluster(memory_limit="512MiB") as c, Client(c) as client:
        warm_up(client)
        (q, k, v), norms = windowed_norms(tokens, block, window)
        result["kernel_calls"] = sum(
            1 for layer in norms.dask.layers.values() for t in layer.values()
            if isinstance(t, tuple) and t and t[0] is sdask._attend
        )  # fmt: skip
        result["rss_before_mib"] = [round(m["VmRSS"]) for m in client.run(memory_mib).values()]
        client.run(reset_peak)
        t0 = time.perf_counter()
        got = norms.compute()
        result["seconds"] = time.perf_counter() - t0
        result["peak_mib"] = [round(m["VmHWM"]) for m in client.run(memory_mib).values()]
        result["load"] = os.getloadavg()[0]
        result["max_rel_err"] = check_blocks(q, k, v, got, block, window)
        if args.show_failure:
            _, whole = windowed_norms(tokens, tokens, window)
            t0 = time.perf_counter()
            try:
                whole.compute()
                result["one_chunk"] = "succeeded"
            except Exception as e:  # (KilledWorker: the nanny ended it at 95% of the limit)
                result["one_chunk"] = f"{type(e).__name__} after {time.perf_counter() - t0:.1f} s"
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=8192, help="L and S chunk (blocks layout)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-overhead", action="store_true", help="skip part 1")
    parser.add_argument("--memory-run", action="store_true", help="part 2")
    parser.add_argument("--memory-tokens", type=int, default=1 << 21)
    parser.add_argument("--memory-block", type=int, default=32768)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--show-failure", action="store_true", help="part 2 in one chunk too")
    parser.add_argument("--json", help="write the runs to this file")
    args = parser.parse_args()
    report: dict = {"load_at_start": os.getloadavg()}
    if not args.no_overhead:
        report["overhead"] = overhead(args)
        summarize(report["overhead"])
    if args.memory_run:
        report["memory"] = memory_run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
