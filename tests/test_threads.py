"""The thread pool: settings, bitwise equal results for any thread count, fork, environment."""

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import sdpa


@pytest.fixture
def restore_threads():
    before = sdpa.get_num_threads()
    yield
    sdpa.set_num_threads(before)


def test_set_get_round_trip(restore_threads):
    for n in (1, 2, 3, 8, 1):
        sdpa.set_num_threads(n)
        assert sdpa.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, -100])
def test_invalid_thread_count(restore_threads, n):
    before = sdpa.get_num_threads()
    with pytest.raises(ValueError, match="n"):
        sdpa.set_num_threads(n)
    assert sdpa.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, "2", None], ids=["float", "str", "None"])
def test_non_integer_thread_count(restore_threads, n):
    with pytest.raises(TypeError):
        sdpa.set_num_threads(n)


def _inputs(rng, q_shape, kv_shape, ev):
    q = rng.standard_normal(q_shape, dtype=np.float32)
    k = rng.standard_normal(kv_shape, dtype=np.float32)
    v = rng.standard_normal((*kv_shape[:-1], ev), dtype=np.float32)
    return q, k, v


# name -> (q shape, kv shape, Ev, kwargs)
CASES = {
    "plain": ((2, 4, 300, 32), (2, 4, 300, 32), 32, {}),
    "causal": ((2, 4, 300, 32), (2, 4, 513, 32), 16, {"is_causal": True}),
    "gqa-causal": ((2, 8, 130, 16), (2, 2, 130, 16), 16, {"enable_gqa": True, "is_causal": True}),
    "decode-L1-S4096": ((4, 1, 64), (4, 4096, 64), 64, {}),
    "decode-L3-S4096-causal": ((2, 3, 64), (2, 4096, 64), 64, {"is_causal": True}),
    "large-batch": ((64, 8, 20, 16), (64, 8, 20, 16), 16, {}),
    "mask": ((3, 70, 16), (3, 300, 16), 8, {"mask": True}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_results_do_not_depend_on_thread_count(isa, rng, restore_threads, case):
    q_shape, kv_shape, ev, kwargs = case
    q, k, v = _inputs(rng, q_shape, kv_shape, ev)
    kwargs = dict(kwargs)
    mask = rng.random((q_shape[-2], kv_shape[-2])) < 0.5 if kwargs.pop("mask", False) else None
    results = []
    for n in (1, 2, 3):
        sdpa.set_num_threads(n)
        results.append(sdpa.scaled_dot_product_attention(q, k, v, mask, **kwargs))
    assert np.all(np.isfinite(results[0]))
    for n, r in zip((2, 3), results[1:]):
        assert np.array_equal(results[0], r), f"{n} threads differ from 1 thread"


def test_many_calls_reuse_the_pool(rng, restore_threads):
    sdpa.set_num_threads(2)
    q, k, v = _inputs(rng, (2, 70, 16), (2, 70, 16), 16)
    first = sdpa.scaled_dot_product_attention(q, k, v)
    for _ in range(200):
        assert np.array_equal(sdpa.scaled_dot_product_attention(q, k, v), first)


def test_concurrent_callers(rng, restore_threads):
    # several Python threads calling at once (the GIL is released) all get correct results
    from concurrent.futures import ThreadPoolExecutor

    sdpa.set_num_threads(2)
    problems = [_inputs(rng, (2, 65, 16), (2, 130, 16), 8) for _ in range(8)]
    expected = [sdpa.scaled_dot_product_attention(*p) for p in problems]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda p: sdpa.scaled_dot_product_attention(*p), problems))
            for g, e in zip(got, expected):
                assert np.array_equal(g, e)


def _wait_or_kill(pid, timeout):
    """Wait for a child process; kill it and fail if it does not finish in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish within {timeout} s (deadlock after fork?)")


def test_fork_after_pool_use(rng, restore_threads):
    sdpa.set_num_threads(2)
    q, k, v = _inputs(rng, (4, 130, 32), (4, 300, 32), 32)
    expected = sdpa.scaled_dot_product_attention(q, k, v)  # the pool now exists and has worked
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a multi-threaded process; surviving it is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: compute with the pool again, report through the exit code
        code = 1
        try:
            sdpa.set_num_threads(2)
            ok = np.array_equal(sdpa.scaled_dot_product_attention(q, k, v), expected)
            sdpa.set_num_threads(1)
            ok = ok and np.array_equal(sdpa.scaled_dot_product_attention(q, k, v), expected)
            code = 0 if ok else 3
        finally:
            os._exit(code)
    assert _wait_or_kill(pid, timeout=60) == 0
    # and the parent's pool still works
    assert np.array_equal(sdpa.scaled_dot_product_attention(q, k, v), expected)


def _run_python(code, env_update=(), timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "SDPA_NUM_THREADS"}
    env.update(env_update)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(__file__) + "/..",
    )


@pytest.mark.parametrize("n", [1, 3])
def test_environment_variable(n):
    result = _run_python("import sdpa; print(sdpa.get_num_threads())", {"SDPA_NUM_THREADS": str(n)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(n)


def test_default_is_the_affinity_mask():
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "import sdpa; print(sdpa.get_num_threads())"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    result = _run_python(
        "import os, sdpa; print(sdpa.get_num_threads(), len(os.sched_getaffinity(0)))"
    )
    assert result.returncode == 0, result.stderr
    got, cpus = result.stdout.split()
    assert got == cpus


def test_fork_via_multiprocessing_pool(rng, restore_threads):
    import multiprocessing

    sdpa.set_num_threads(2)
    q, k, v = _inputs(rng, (2, 65, 16), (2, 130, 16), 16)
    expected = sdpa.scaled_dot_product_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.starmap_async(sdpa.scaled_dot_product_attention, [(q, k, v)] * 4).get(
                timeout=60
            )
    for r in results:
        assert np.array_equal(r, expected)


def test_threadpoolctl_controls_the_pool(restore_threads):
    from threadpoolctl import threadpool_info, threadpool_limits

    sdpa.set_num_threads(2)
    entries = [i for i in threadpool_info() if i["user_api"] == "sdpa"]
    assert len(entries) == 1 and entries[0]["num_threads"] == 2
    with threadpool_limits(limits=1, user_api="sdpa"):
        assert sdpa.get_num_threads() == 1
    assert sdpa.get_num_threads() == 2
    with threadpool_limits(limits=1):  # all pools, BLAS and sdpa alike
        assert sdpa.get_num_threads() == 1
    assert sdpa.get_num_threads() == 2
