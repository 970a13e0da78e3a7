"""Findings of a hostile review (issue 9): each test here failed on the code before its fix."""

import os
import subprocess
import sys

import numpy as np
import pytest

import sdpa

attention = sdpa.scaled_dot_product_attention


# ---- out ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [((2, 5, 8), (2, 7, 8), (2, 7, 0)), ((2, 0, 8), (2, 7, 8), (2, 7, 4)), ((0, 5, 8),) * 3],
    ids=["Ev=0", "L=0", "B=0"],
)
def test_an_empty_out_of_the_right_shape_is_accepted(shapes):
    q, k, v = (np.ones(s, np.float32) for s in shapes)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), np.float32)  # NumPy 2 may give it 0 strides
    assert attention(q, k, v, out=out) is out
    assert attention(q, k, v, out=out, return_lse=True)[0] is out


def test_an_out_whose_rows_overlap_is_refused(rng):
    q = rng.standard_normal((5, 8)).astype(np.float32)
    v = rng.standard_normal((5, 4)).astype(np.float32)
    base = np.zeros(64, np.float32)
    out = np.lib.stride_tricks.as_strided(base, (5, 4), (8, 4))  # row i+1 starts inside row i
    with pytest.raises(ValueError, match="out must not overlap itself"):
        attention(q, q, v, out=out)
    assert np.all(base == 0)


def test_an_out_laid_out_unusually_but_without_overlap_is_accepted(rng):
    q = rng.standard_normal((3, 8))
    v = rng.standard_normal((3, 2))
    base = np.zeros(8)
    # elements at byte offsets 0, 24, 16, 40, 32, 56: no nesting of the dims, and no overlap
    out = np.lib.stride_tricks.as_strided(base, (3, 2), (16, 24))
    result = attention(q, q, v, out=out)
    assert result is out
    np.testing.assert_allclose(out, sdpa.reference.scaled_dot_product_attention(q, q, v))


# ---- argument types -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["is_causal", "return_lse", "enable_gqa"])
def test_flags_must_be_bools(name):
    q = np.ones((2, 3, 4), np.float32)
    for bad in ("no", 1, None, [True]):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            attention(q, q, q, **{name: bad})
    attention(q, q, q, **{name: np.bool_(True)})  # NumPy's bool is a bool


@pytest.mark.parametrize("position", ["query", "key", "value", "attn_mask"])
def test_masked_arrays_are_refused_by_name(position):
    arrays = {n: np.ones((3, 4), np.float32) for n in ("query", "key", "value")}
    arrays["attn_mask"] = np.ones((3, 3), bool)
    arrays[position] = np.ma.masked_array(arrays[position], mask=np.eye(*arrays[position].shape))
    with pytest.raises(TypeError, match=f"{position} is a numpy.ma.MaskedArray"):
        attention(**arrays)


def test_attention_weights_takes_the_mask_by_keyword_only(rng):
    q = rng.standard_normal((4, 4))
    with pytest.raises(TypeError, match="positional"):
        sdpa.attention_weights(q, q, q)  # a value passed by habit is not taken for a float mask
    with pytest.raises(TypeError, match="positional"):
        sdpa.reference.attention_weights(q, q, q)
    mask = rng.random((4, 4)) < 0.5
    np.testing.assert_allclose(
        sdpa.attention_weights(q, q, attn_mask=mask),
        sdpa.reference.attention_weights(q, q, attn_mask=mask),
    )


def test_a_huge_unsigned_window_side_is_unbounded(rng):
    q = rng.standard_normal((1, 9, 8))
    k = rng.standard_normal((1, 6, 8))
    for fn in (attention, sdpa.reference.scaled_dot_product_attention):
        got = fn(q, k, k, window=(np.uint64(2**63), 0))
        want = fn(q, k, k, window=(None, 0))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---- threads ------------------------------------------------------------------------------------


def test_too_many_threads_in_the_environment_are_capped_with_a_warning():
    code = "import warnings, sdpa; print(sdpa.get_num_threads())"
    env = {**os.environ, "SDPA_NUM_THREADS": "99999", "PYTHONWARNINGS": "always"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4096"]
    assert "SDPA_NUM_THREADS=99999 is more than the 4096 threads sdpa allows" in result.stderr


# ---- work and memory bounded by the problem -----------------------------------------------------


def test_scratch_is_bounded_by_the_problem_not_the_block_sizes():
    # One key and E = 2^24: a key block of 512 keys x E floats would be 32 GB of scratch.
    q = np.ones((1, 1, 1 << 24), np.float32)
    out = attention(q, q, q[..., :1])
    np.testing.assert_array_equal(out, np.ones((1, 1, 1), np.float32))


def test_an_empty_value_dim_does_no_work():
    # L = S = 2^20 with Ev = 0: the output is empty, so the 2^40 scores are never computed (that
    # would take far beyond the subprocess's limit; done right, it is immediate).
    code = (
        "import numpy as np, sdpa\n"
        "q = np.broadcast_to(np.ones(64, np.float32), (1 << 20, 64))\n"
        "v = np.empty((1 << 20, 0), np.float32)\n"
        "print(sdpa.scaled_dot_product_attention(q, q, v).shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1048576, 0)"


# ---- values beyond float32's range --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 1e39},
        {"scale": -1e39},
        {"softcap": 1e39},
        {"softcap": 1e-40},
        {"alibi_slopes": np.array([1e39, 0.5])},
    ],  # fmt: skip
    ids=["scale", "negative-scale", "softcap", "tiny-softcap", "alibi"],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["float16", "float32"])
def test_huge_scalars_give_the_float64_answer(rng, kwargs, dtype):
    q = rng.standard_normal((2, 6, 8)).astype(dtype)
    k = rng.standard_normal((2, 9, 8)).astype(dtype)
    v = rng.standard_normal((2, 9, 4)).astype(dtype)
    kwargs = {**kwargs, "is_causal": True}
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    up = [a.astype(np.float64) for a in (q, k, v)]
    ref, ref_lse = sdpa.reference.scaled_dot_product_attention(*up, return_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-2 if dtype == np.float16 else 1e-6, atol=1e-3)
    with np.errstate(over="ignore"):  # (scale 1e39 makes lse ~1e39: +-inf in float32)
        np.testing.assert_allclose(lse, ref_lse.astype(np.float32), rtol=1e-6, atol=1e-6)
    w = sdpa.attention_weights(q, k, **kwargs)
    assert w.dtype == dtype and np.all(np.isfinite(w))


@pytest.mark.parametrize("rows", [1, 40], ids=["few-rows", "panels"])
def test_the_running_sums_do_not_drift_over_long_key_ranges(rows):
    # 2^29 keys of constant value 3 (zero-stride views: no memory): the sums of 3 and of 1 pass
    # 2^24, where adding each key's term to the running float sum loses it (this gave 3.33).
    S = 1 << 29
    q = np.ones((rows, 1), np.float32)
    k = np.broadcast_to(np.ones((1, 1), np.float32), (S, 1))
    v = np.broadcast_to(np.full((1, 1), 3.0, np.float32), (S, 1))
    out, lse = attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)
    np.testing.assert_allclose(lse, np.log(S) + 1.0, rtol=1e-6)


def test_a_scale_that_makes_the_query_overflow_float32(rng):
    q = np.full((1, 2, 8), 4, np.float32)  # 4 * 1e38 is beyond float32, the scores are not
    k = (rng.standard_normal((1, 3, 8)) * 1e-6).astype(np.float32)
    v = rng.standard_normal((1, 3, 4)).astype(np.float32)
    out, lse = attention(q, k, v, scale=1e38, return_lse=True)
    ref, ref_lse = sdpa.reference.scaled_dot_product_attention(
        *(a.astype(np.float64) for a in (q, k, v)), scale=1e38, return_lse=True
    )
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


def test_a_plus_inf_score_with_a_sink_gives_lse_plus_inf():
    q = np.full((1, 1, 2), np.inf)
    k = np.ones((1, 3, 2))
    out, lse = attention(q, k, k, sinks=np.array([0.5]), return_lse=True)
    ref_out, ref_lse = sdpa.reference.scaled_dot_product_attention(
        q, k, k, sinks=np.array([0.5]), return_lse=True
    )
    assert lse[0, 0] == np.inf and ref_lse[0, 0] == np.inf
    assert np.isnan(out).all() and np.isnan(ref_out).all()


def test_a_signal_handler_may_call_sdpa_during_a_long_call(rng):
    import signal

    q = rng.standard_normal((1, 16384, 64)).astype(np.float32)  # ~0.1-0.3 s on one thread
    small = rng.standard_normal((2, 64, 16)).astype(np.float32)
    before = sdpa.get_num_threads()
    inner = []

    def handler(signum, frame):
        inner.append(attention(small, small, small, is_causal=True))

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        sdpa.set_num_threads(1)  # one thread, so the result is bitwise reproducible
        quiet = attention(q, q, q, is_causal=True)
        signal.setitimer(signal.ITIMER_REAL, 0.03, 0.03)
        busy = attention(q, q, q, is_causal=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        sdpa.set_num_threads(before)
    assert inner, "the handler never ran during the call"
    np.testing.assert_array_equal(busy, quiet)  # the inner calls did not touch its scratch
    want = sdpa.reference.scaled_dot_product_attention(small, small, small, is_causal=True)
    np.testing.assert_allclose(inner[0], want, rtol=1e-5, atol=1e-6)
