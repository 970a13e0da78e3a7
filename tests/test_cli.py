"""The command line: `python -m sdpa bench | config | <unknown>` (the bench is never timed here;
these only check that it runs and reports what it promises)."""

import json
import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "sdpa", *args], capture_output=True, text=True, timeout=timeout
    )


def test_bench_runs_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    args = ("--quick", "--shapes", "seed,decode", "--threads", "1", "--json", str(path))
    result = run("bench", *args)
    assert result.returncode == 0, result.stderr
    assert "seed" in result.stdout and "GFLOP/s" in result.stdout
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["gemm_gflops"] > 0 and data["read_gbps"] > 0
    seed, decode = data["rows"]
    assert seed["shape"] == "seed" and seed["sdpa_ms"] > 0 and seed["vs_naive"] > 0
    assert seed["gemm_gflops"] > 0 and "read_gbps" not in seed
    assert decode["kv_gbps"] > 0 and decode["bandwidth_fraction"] > 0


def test_bench_rejects_unknown_shapes():
    result = run("bench", "--shapes", "seed,nonesuch")
    assert result.returncode != 0 and "unknown shapes: nonesuch" in result.stderr


def test_config_and_unknown_command():
    result = run("config")
    assert result.returncode == 0 and "available_isas" in result.stdout
    result = run("frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr
