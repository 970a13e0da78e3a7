"""Ctrl-C stops a long call: the calling thread lets Python's signal handlers run between blocks
of work, the workers stop, KeyboardInterrupt is raised, and the pool works afterwards."""

import subprocess
import sys
import textwrap

import pytest

# A call of about 12 s at 2 threads (L = S = 65536, E = 128: 1.1e12 multiply-adds, at most 0.2e12
# a second on this kind of machine), interrupted after 0.5 s. The limit below is far from both: a
# call that ignored the signal would take its whole time, one that stops takes about 0.5 s.
SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, time
    import numpy as np, sdpa

    # (Python installs its KeyboardInterrupt handler only where SIGINT was not ignored: a job
    # started in the background by a non-interactive shell inherits SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sdpa.set_num_threads({threads})
    q = np.random.default_rng(0).standard_normal((1, 65536, 128), dtype=np.float32)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    try:
        sdpa.scaled_dot_product_attention(q, q, q{extra})
        print("finished")
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter() - start)
    small = q[:, :300]
    out = sdpa.scaled_dot_product_attention(small, small, small, is_causal=True)
    ref = sdpa.reference.scaled_dot_product_attention(small, small, small, is_causal=True)
    print("after", float(np.max(np.abs(out - ref))))
    """
)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "extra", ["", ", is_causal=True, return_lse=True"], ids=["direct", "general"]
)
def test_ctrl_c_stops_a_long_call(threads, extra):
    code = SCRIPT.format(threads=threads, extra=extra)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split("\n")[:2]
    word, seconds = first.split()
    assert word == "interrupted", result.stdout
    assert float(seconds) < 3.0  # it was stopped, not run to its end
    assert second.split()[0] == "after" and float(second.split()[1]) < 1e-5  # the pool still works
