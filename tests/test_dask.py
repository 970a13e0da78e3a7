"""sdpa.dask: attention over Dask arrays, judged against the single-machine call, on a real
distributed.LocalCluster (2 worker processes x 1 thread, started and closed by a fixture) and on
the threaded scheduler. Skipped without dask and distributed (the sdpa[dask] extra)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import sdpa

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

from sdpa import dask as sdask  # noqa: E402

B, H, L, S, E, EV = 2, 4, 70, 190, 16, 8
# Every dim the work is cut along: batch, heads, queries, keys (S not a multiple of its chunk).
Q_CHUNKS, KV_CHUNKS = (1, 2, 32, E), (1, 2, 64)


@pytest.fixture(scope="module")
def client():
    """A real cluster: 2 worker processes with 1 thread each (spawned), closed after the module.
    Not the default client: the tests name it where they use it, and the threaded scheduler
    stays the default elsewhere."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.fixture(params=["threads", "cluster"])
def compute(request):
    """dask.compute on the threaded scheduler, or on the LocalCluster."""
    if request.param == "threads":
        return lambda *xs: dask.compute(*xs, scheduler="threads")
    c = request.getfixturevalue("client")
    return lambda *xs: tuple(c.compute(list(xs), sync=True))


def operands(rng, dtype=np.float32, hkv=H):
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, hkv, S, EV)).astype(dtype)
    return q, k, v


def chunked(q, k, v, kv_heads=2):
    kv = KV_CHUNKS[:1] + (kv_heads,) + KV_CHUNKS[2:]
    return (
        da.from_array(q, chunks=Q_CHUNKS),
        da.from_array(k, chunks=kv + (E,)),
        da.from_array(v, chunks=kv + (EV,)),
    )


def assert_close(got, want, rtol):
    """Relative to the output's scale (attention outputs are convex combinations of values)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    err = np.max(np.abs(got.astype(np.float64) - want), initial=0.0)
    assert err <= rtol * max(np.max(np.abs(want), initial=0.0), 1e-30), err


def assert_lse_close(got, want, rtol):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    err = np.abs(got[finite].astype(np.float64) - want[finite])
    assert np.all(err <= rtol * np.maximum(1.0, np.abs(want[finite]))), err.max(initial=0)


def variants(rng):
    return {
        "full": {},
        "causal": {"is_causal": True},
        "causal-bottom-right": {"is_causal": True, "alignment": "bottom_right"},
        "window": {"window": (30, 5)},
        "window-bottom-right": {"window": (20, 0), "alignment": "bottom_right"},
        "alibi": {"is_causal": True, "alibi_slopes": np.array([0.2, 0.1, 0.05, 0.01])},
        "softcap-scale": {"softcap": 3.0, "scale": 0.3, "window": (None, 40)},
        "kv-lengths": {"kv_lengths": np.array([[0], [150]]), "is_causal": True},
        "ragged-sinks": {
            "kv_lengths": rng.integers(0, S + 1, (B, H)),
            "q_lengths": rng.integers(0, L + 1, (B, H)),
            "sinks": rng.standard_normal(H),
            "alignment": "bottom_right",
            "is_causal": True,
        },
        "offsets": {
            "q_offset": 500,
            "kv_offset": np.array([400, 450, 500, 550]),
            "window": (90, 0),
        },
    }


VARIANTS = sorted(variants(np.random.default_rng(0)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_single_call(compute, rng, variant):
    q, k, v = operands(rng)
    kwargs = variants(rng)[variant]
    want, want_lse = sdpa.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    out, lse = sdask.scaled_dot_product_attention(*chunked(q, k, v), return_lse=True, **kwargs)
    assert out.chunks == da.from_array(q, chunks=Q_CHUNKS).chunks[:-1] + ((EV,),)
    assert lse.chunks == out.chunks[:-1]
    got, got_lse = compute(out, lse)
    assert_close(got, want, 1e-6)
    assert_lse_close(got_lse, want_lse, 1e-6)


def test_float64_and_split_every(rng):
    q, k, v = operands(rng, np.float64)
    kwargs = {"is_causal": True, "alignment": "bottom_right", "window": (100, None)}
    want = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    for split_every in (2, 3, 8):
        out = sdask.scaled_dot_product_attention(
            *chunked(q, k, v), split_every=split_every, **kwargs
        )
        assert_close(out.compute(scheduler="threads"), want, 1e-12)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["kv-chunk-1", "kv-chunk-2"])
def test_grouped_query_attention(compute, rng, kv_heads):
    # 4 query heads in chunks of 2 over 2 key/value heads: a chunk within one group (G = 2);
    # key and value are recut along the heads to match whatever their chunks were.
    q, k, v = operands(rng, hkv=2)
    kwargs = {"enable_gqa": True, "is_causal": True, "alibi_slopes": np.array([0.1, 0.2, 0.3, 0.4])}
    want = sdpa.scaled_dot_product_attention(q, k, v, **kwargs)
    (got,) = compute(sdask.scaled_dot_product_attention(*chunked(q, k, v, kv_heads), **kwargs))
    assert_close(got, want, 1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_dask_or_numpy(compute, rng, kind):
    q, k, v = operands(rng)
    if kind == "bool":
        mask = rng.random((H, L, S)) < 0.7
    else:
        mask = rng.standard_normal((B, 1, L, S)).astype(np.float32)
        mask[..., 5, :] = -np.inf  # a row with no key
    want = sdpa.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    operands_ = chunked(q, k, v)
    as_dask = da.from_array(mask, chunks=mask.shape[:-2] + Q_CHUNKS[2:3] + KV_CHUNKS[2:])
    for m in (mask, as_dask):
        (got,) = compute(sdask.scaled_dot_product_attention(*operands_, m, is_causal=True))
        assert_close(got, want, 1e-6)


def test_lse_merges_exactly(rng):
    # The lse of two calls over the two halves of the keys (at their positions) merges into the
    # call over all of them: the property the reduction inside rests on, seen from outside.
    q, k, v = operands(rng)
    Q, K, V = chunked(q, k, v)
    kwargs = {"is_causal": True, "alignment": "bottom_right"}
    whole, whole_lse = sdask.scaled_dot_product_attention(Q, K, V, return_lse=True, **kwargs)
    half = 128  # (a key chunk boundary)
    shift = S - L  # the bottom-right diagonal of the whole, as a query position
    parts = [
        sdask.scaled_dot_product_attention(
            Q, K[..., a:b, :], V[..., a:b, :], is_causal=True, q_offset=shift, kv_offset=a,
            return_lse=True,
        )
        for a, b in ((0, half), (half, S))
    ]  # fmt: skip
    whole, whole_lse, *flat = dask.compute(whole, whole_lse, *parts[0], *parts[1])
    merged, merged_lse = sdpa.merge_attention(flat[0::2], flat[1::2])
    assert_close(merged, whole, 1e-6)
    assert_lse_close(merged_lse, whole_lse, 1e-6)


def kernel_calls(out):
    """The kernel calls in the graph of `out` (tasks of sdask._attend), and all its tasks."""
    layer = out.dask.layers[out.name]
    calls = sum(1 for task in layer.values() if task[0] is sdask._attend)
    return calls, len(layer)


def square(n, c):
    x = da.zeros((1, 1, n * c, 8), chunks=(1, 1, c, 8), dtype=np.float32)
    return x, x, x


def test_graph_of_a_causal_call_has_half_the_blocks():
    n = 8
    full_calls, full_tasks = kernel_calls(sdask.scaled_dot_product_attention(*square(n, 16)))
    causal = sdask.scaled_dot_product_attention(*square(n, 16), is_causal=True)
    calls, tasks = kernel_calls(causal)
    assert full_calls == n * n and calls == n * (n + 1) // 2  # 64 and 36
    assert tasks <= 0.6 * full_tasks, (tasks, full_tasks)
    (optimized,) = dask.optimize(causal)  # what is submitted: inputs culled, nothing added
    assert len(optimized.__dask_graph__()) <= len(causal.__dask_graph__())


def attended_block_pairs(n, c, kwargs):
    """(query block, key block) pairs with a key some query attends, over heads: by brute force,
    from the attention weights of the whole problem (positive exactly where a key is attended)."""
    zeros = np.zeros((3, n * c, 8))
    weights = sdpa.attention_weights(zeros, zeros, **kwargs).max(axis=0)
    return int((weights.reshape(n, c, n, c).max(axis=(1, 3)) > 0).sum())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": (16, 0)},
        {"window": (0, 0)},
        {"window": (40, 3), "alignment": "bottom_right", "q_offset": np.array([0, 20, 40])},
        {"kv_lengths": np.array([40, 0, 7])},
        {"is_causal": True, "q_lengths": np.array([33, 80, 1])},
        {"is_causal": True, "alignment": "bottom_right", "kv_lengths": np.array([16, 30, 100])},
        {"is_causal": True, "kv_offset": np.array([70, 0, -40])},
    ],
    ids=lambda kw: "-".join(kw),
)
def test_graph_has_exactly_the_attended_block_pairs(kwargs):
    # a different diagonal per head: a pair is kept when any head attends in it
    x = da.zeros((3, 128, 8), chunks=(3, 16, 8), dtype=np.float64)
    out = sdask.scaled_dot_product_attention(x, x, x, **kwargs)
    calls = kernel_calls(out)[0]
    assert calls == attended_block_pairs(8, 16, kwargs) < 64


def test_a_mask_prunes_nothing_and_blocks_with_no_key_read_none(rng):
    mask = np.zeros((128, 128), bool)
    out = sdask.scaled_dot_product_attention(*square(8, 16), mask, is_causal=True)
    assert kernel_calls(out)[0] == 36
    # kv_lengths 0 everywhere: no kernel call on any key, zeros (and the sinks' lse) all the same
    q, k, v = operands(rng)
    kwargs = {"kv_lengths": np.array(0), "sinks": np.ones(H), "return_lse": True}
    out, lse = sdask.scaled_dot_product_attention(*chunked(q, k, v), **kwargs)
    assert kernel_calls(out)[0] == 0
    got, got_lse = dask.compute(out, lse, scheduler="threads")
    assert np.all(got == 0) and np.all(got_lse == 1)


def test_bad_chunking_is_a_clear_error(rng):
    q, k, v = operands(rng)
    Q, K, V = chunked(q, k, v)
    with pytest.raises(ValueError, match=r"query is split along its last dim.*rechunk\({-1: -1}\)"):
        sdask.scaled_dot_product_attention(Q.rechunk({-1: 8}), K, V)
    with pytest.raises(ValueError, match=r"value is split along its last dim"):
        sdask.scaled_dot_product_attention(Q, K, V.rechunk({-1: 4}))
    with pytest.raises(ValueError, match=r"key and value must be cut alike along S.*rechunk"):
        sdask.scaled_dot_product_attention(Q, K, V.rechunk({-2: 50}))
    mask = da.ones((L, S), chunks=(L, 64), dtype=bool)
    with pytest.raises(ValueError, match=r"attn_mask must be cut along L"):
        sdask.scaled_dot_product_attention(Q, K, V, mask)
    q3 = da.from_array(np.ones((1, 6, 8, 4), np.float32), chunks=(1, 3, 8, 4))
    kv = da.from_array(np.ones((1, 3, 8, 4), np.float32), chunks=(1, 3, 8, 4))
    with pytest.raises(ValueError, match=r"group boundaries; rechunk query along dim -3"):
        sdask.scaled_dot_product_attention(q3, kv, kv, enable_gqa=True)
    with pytest.raises(ValueError, match=r"pass enable_gqa=True"):
        sdask.scaled_dot_product_attention(q3, kv, kv)
    with pytest.raises(TypeError, match="unexpected keyword argument 'out'"):
        sdask.scaled_dot_product_attention(Q, K, V, out=np.empty(1))
    with pytest.raises(ValueError, match="kv_lengths must lie in"):
        sdask.scaled_dot_product_attention(Q, K, V, kv_lengths=np.array([S + 1]))


def test_varlen_attention(compute, rng):
    lens_q, lens_k = np.array([5, 0, 17, 9, 30, 2]), np.array([7, 3, 17, 12, 25, 2])
    cu_q, cu_k = np.r_[0, np.cumsum(lens_q)], np.r_[0, np.cumsum(lens_k)]
    q = rng.standard_normal((cu_q[-1], 4, 8)).astype(np.float32)
    k = rng.standard_normal((cu_k[-1], 2, 8)).astype(np.float32)
    v = rng.standard_normal((cu_k[-1], 2, 5)).astype(np.float32)
    kwargs = {"is_causal": True, "alibi_slopes": rng.uniform(0, 1, (6, 4)), "sinks": np.ones(4)}
    want, want_lse = sdpa.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    rows_q, rows_k = (22, 39, 2), (27, 37, 2)  # sequences 0-2, 3-4, 5 in each
    Q = da.from_array(q, chunks=(rows_q, 2, 8))
    K, V = da.from_array(k, chunks=(rows_k, 1, 8)), da.from_array(v, chunks=(rows_k, 1, 5))
    out, lse = sdask.varlen_attention(Q, K, V, cu_q, cu_k, return_lse=True, **kwargs)
    got, got_lse = compute(out, lse)
    assert_close(got, want, 1e-6)
    assert_lse_close(got_lse, want_lse, 1e-6)
    with pytest.raises(ValueError, match="not where a sequence ends in both"):
        sdask.varlen_attention(Q.rechunk({0: (20, 41, 2)}), K, V, cu_q, cu_k)


def test_each_task_runs_as_many_sdpa_threads_as_its_worker(client, rng):
    q, k, v = operands(rng)
    before = sdpa.get_num_threads()
    client.compute(sdask.scaled_dot_product_attention(*chunked(q, k, v)), sync=True)
    assert set(client.run(sdpa.get_num_threads).values()) == {1}  # threads_per_worker=1
    sdask.scaled_dot_product_attention(*chunked(q, k, v)).compute(scheduler="threads")
    assert sdpa.get_num_threads() == before  # the caller's own process keeps its setting


def test_import_sdpa_does_not_import_dask():
    code = "import sdpa, sys; assert not {'dask', 'distributed'} & set(sys.modules), 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


EXPR_CHECK = """
import dask.array as da, numpy as np, sdpa, sdpa.dask
assert da.array_expr_enabled()
x = np.random.default_rng(0).standard_normal((2, 3, 40, 8)).astype(np.float32)
X = da.from_array(x, chunks=(1, 3, 16, 8))
kw = dict(is_causal=True, alignment="bottom_right", sinks=np.ones(3), return_lse=True)
out, lse = sdpa.dask.scaled_dot_product_attention(X, X[:, :, :30], X[:, :, :30], **kw)
want, want_lse = sdpa.scaled_dot_product_attention(x, x[:, :, :30], x[:, :, :30], **kw)
got, got_lse = da.compute(out, lse, scheduler="threads")
np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
np.testing.assert_allclose(got_lse, want_lse, rtol=1e-6)
"""


@pytest.mark.skipif(
    not hasattr(da, "array_expr_enabled"), reason="this dask has no expression-based arrays"
)
def test_dask_array_query_planning():
    # Dask's expression-based arrays (array.query-planning, off by default so far, to become the
    # default): the graph is wrapped with their from_graph. The setting must precede the import
    # of dask.array, hence a fresh interpreter.
    env = {**os.environ, "DASK_ARRAY__QUERY_PLANNING": "True"}
    subprocess.run([sys.executable, "-c", EXPR_CHECK], check=True, env=env)


# ---- A worker killed in the middle of a computation.


def gate_last(block, name, last, block_info=None):
    """Identity; the last key chunk waits for the cluster's Event `name` first, its thread
    seceded from the worker's pool, so that the worker runs the other tasks meanwhile."""
    if block_info is not None and block_info[0]["chunk-location"][2] == last:
        distributed.secede()
        assert distributed.Event(name).wait(timeout=60)
        distributed.rejoin()
    return block


async def die():
    os._exit(1)


def wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def partials_held(client, name):
    """{worker: number of partial (out, lse) results of graph `name` in its memory}."""
    held = client.has_what()
    return {w: sum(1 for key in keys if key[0] == f"{name}-part") for w, keys in held.items()}


def test_a_killed_worker_is_recomputed_and_the_result_is_right(client, rng):
    q, k, v = operands(rng)
    Q, K, V = chunked(q, k, v)
    gate = f"sdpa-dask-gate-{os.getpid()}-{time.monotonic_ns()}"
    # The last key chunk waits at the gate: every query block's merge needs it (bottom-right
    # causal), so the other partials wait in the workers' memory until the gate opens.
    K = K.map_blocks(gate_last, gate, K.numblocks[2] - 1, meta=np.empty((0,) * 4, K.dtype))
    kwargs = {"is_causal": True, "alignment": "bottom_right"}
    out = sdask.scaled_dot_product_attention(Q, K, V, **kwargs)
    with distributed.get_task_stream(client) as stream:
        future = client.compute(out)
        # (24 partials can be computed before the gate opens: wait for half of them)
        wait_until(lambda: sum(partials_held(client, out.name).values()) >= 12)
        victim = max(partials_held(client, out.name).items(), key=lambda item: item[1])[0]
        client.run(die, workers=[victim], wait=False)
        wait_until(lambda: victim not in client.scheduler_info()["workers"])
        distributed.Event(gate, client=client).set()
        got = future.result(timeout=120)
    assert_close(got, sdpa.scaled_dot_product_attention(q, k, v, **kwargs), 1e-6)
    parts = [t["key"] for t in stream.data if t["key"][0] == f"{out.name}-part"]
    assert len(parts) > len(set(parts)), "no partial was computed twice"
    client.wait_for_workers(2, timeout=60)  # (the nanny restarts it, for whatever runs next)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_partials_merge_in_float32(rng, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    q, k, v = (x.astype(dtype) for x in operands(rng))
    kwargs = {"is_causal": True, "alignment": "bottom_right", "window": (10**30, None)}
    # The partials are computed in float32 (a float32 query over the half K and V: float
    # panels, whereas a bfloat16 call on avx512_bf16 takes the bfloat16 panels, which round P)
    # and merged in float32, then rounded once to the output type.
    want = sdpa.scaled_dot_product_attention(q.astype(np.float32), k, v, **kwargs).astype(dtype)
    got = sdask.scaled_dot_product_attention(*chunked(q, k, v), **kwargs).compute()
    assert got.dtype == dtype
    # One rounding, not one per partial: equal but for the odd last-bit tie (a bfloat16 partial
    # per key chunk differs in a third of the elements).
    assert np.mean(got != want) < 0.01
    ulp = float(np.finfo(np.float16).eps) if dtype == np.float16 else 2.0**-7
    assert_close(got.astype(np.float32), want.astype(np.float32), ulp)
