"""The command line: `python -m sdpa [--help] | bench | config | <unknown>` (the bench is never
timed here; these only check that it runs and reports what it promises)."""

import json
import subprocess
import sys

import pytest

import sdpa


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


def test_bench_rejects_unknown_shapes_and_lists_the_valid_ones():
    result = run("bench", "--shapes", "seed,nonesuch")
    assert result.returncode != 0 and "unknown shapes: nonesuch" in result.stderr
    valid = result.stderr.split("(valid: ")[1].split(")")[0].split(", ")
    assert "seed" in valid and "decode" in valid and "nonesuch" not in valid


def test_config_and_unknown_command():
    result = run("config")
    assert result.returncode == 0 and "available_isas" in result.stdout
    assert result.stdout.count("available_isas") == 1
    result = run("frobnicate")
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr
    for command in ("demo", "bench", "config"):
        assert command in result.stderr


def test_help_describes_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for command in ("demo", "bench", "config"):
        # each command is listed with a line of description after its name
        line = next(x for x in lines if x.split()[:1] == [command])
        assert len(line.split()) > 3, line


@pytest.mark.parametrize(
    "command, expected",
    [
        ("demo", ["--plot", "sdpa[plot]", "three tokens"]),
        ("bench", ["--quick", "--shapes", "--json"]),
        ("config", ["ISA", "show_config"]),
    ],
)
def test_each_command_describes_itself(command, expected):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m sdpa {command}")
    for text in expected:
        assert text in result.stdout
    # --help only describes: the demo does not run, the bench does not time, config does not print
    assert "matches sdpa.reference" not in result.stdout
    assert f"sdpa {sdpa.__version__} bench:" not in result.stdout
    assert "available_isas" not in result.stdout


def test_stray_arguments_are_an_error():
    for args in (("demo", "--frob"), ("config", "extra"), ()):
        result = run(*args)
        assert result.returncode == 2 and "usage: python -m sdpa" in result.stderr, args


def test_show_config_prints_its_table_once_at_the_prompt():
    # python -i reads the lines as typed at the prompt, which echoes each expression's repr
    lines = "import sdpa\nsdpa.show_config()\nc = sdpa.show_config()\nc['isa']\n"
    result = subprocess.run(
        [sys.executable, "-i", "-q"], input=lines, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # once echoed by the first call, nothing by the assignment, then the isa string's repr
    assert result.stdout.count("available_isas") == 1, result.stdout
    assert "{" not in result.stdout  # never the dict repr
    assert result.stdout.strip().splitlines()[-1] == repr(sdpa._config.isa())
