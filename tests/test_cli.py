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
    result = run("bench", "--quick", "--shapes", "seed", "--threads", "1", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert "seed" in result.stdout and "GFLOP/s" in result.stdout
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["gemm_gflops"] > 0 and data["read_gbps"] > 0
    (row,) = data["rows"]
    assert row["shape"] == "seed" and row["sdpa_ms"] > 0 and row["vs_naive"] > 0


def test_bench_rejects_unknown_shapes():
    result = run("bench", "--shapes", "seed,nonesuch")
    assert result.returncode != 0 and "unknown shapes: nonesuch" in result.stderr


def test_config_and_unknown_command():
    result = run("config")
    assert result.returncode == 0 and "available_isas" in result.stdout
    result = run("frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr
