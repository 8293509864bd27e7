"""Stage 1 with many iterations per compiled call gives the per-iteration numbers.

Two checks. In this process, chunked runs (adaptive, 3 and all 5 iterations per
call) must equal bit for bit a reference run of one iteration per compiled call,
copied to the host after each (``fixed_chunk = 1``): the same points and kernels
on the same machine give the same bits whatever the chunking. Against
``tests/data/stage1_golden.npz``, written by ``_golden_runs`` with the per-batch
estimator of before the chunked loop on a tiny model with fixed weights, the
maxima agree within 1e-6 relative and the NaN / zero counts exactly: the file was
written on another CPU, and oneDNN picks its kernels by instruction set, so the
last float32 bit may differ.

Regenerate (only if the sampling scheme changes on purpose):
    .venv/bin/python tests/test_device_loop.py --write
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from randsphere import BallSampler, SamplerPool  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stage1_golden.npz")
SHAPE = (4, 4, 1)
NSAMPS, BATCH, NITERS = 40, 24, 5   # two parts per iteration: 24 + 16 points
SEED, IMG = 1215, 7
TARGETS = [1, 3]
# (name, sampler norm, radius, uniform_ball, compute_slope, use the shm pool)
CASES = [("tf_l2", "l2", None, False, True, False),
         ("tf_li", "li", 0.1, False, False, False),
         ("tf_l1", "l1", None, False, False, False),
         ("shm_l2", "l2", None, False, True, True)]


def _model():
    """tanh MLP 16 -> 8 -> 5 with fixed weights: gradients vary with the input."""
    import tensorflow as tf

    rng = np.random.default_rng(42)
    w1 = tf.constant(rng.normal(size=(16, 8)), tf.float32)
    b1 = tf.constant(rng.normal(size=8) * 0.1, tf.float32)
    w2 = tf.constant(rng.normal(size=(8, 5)), tf.float32)

    def model(x, training=False):
        return tf.tanh(tf.reshape(x, [-1, 16]) @ w1 + b1) @ w2

    return model


def _x0():
    return (np.linspace(-0.4, 0.4, 16, dtype=np.float32)).reshape(SHAPE)


def _golden_runs(make_estimator, **iterate_kwargs):
    """{case: {"grad": [NITERS, T, 3], "slope": ..., "nan": [NITERS, T], "zero": ...}}."""
    out = {}
    for name, norm, radius, uniform, slope, use_pool in CASES:
        sampler = BallSampler.create(norm, radius, uniform)
        est = make_estimator(_model(), SHAPE, BATCH, compute_slope=slope)
        pool = SamplerPool(sampler, SHAPE, BATCH, 1) if use_pool else None
        try:
            stats = list(est.iterate(_x0(), 0, TARGETS, NSAMPS, NITERS, SEED, IMG, sampler, pool,
                                     **iterate_kwargs))
        finally:
            if pool is not None:
                pool.close()
        assert [s.iteration for s in stats] == list(range(NITERS))
        out[name] = {
            "grad": np.stack([s.grad_max for s in stats]),
            "slope": np.stack([s.slope_max if s.slope_max is not None else np.zeros((2, 3))
                               for s in stats]),
            "nan": np.stack([s.nan for s in stats]),
            "zero": np.stack([s.zero for s in stats]),
        }
    return out


def _flatten(runs):
    return {f"{case}__{key}": value for case, d in runs.items() for key, value in d.items()}


def _load_golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


#: how close a stored maximum must be: float32 kernels differ by an ulp (1.2e-7) across CPUs
GOLDEN_RTOL = 1e-6
#: keys holding counts, compared exactly
COUNT_KEYS = ("nan", "zero")


def _chunked(chunk):
    """An estimator factory pinning the chunk length (None: adaptive)."""
    from estimate_gradient_norm import GradientNormEstimator

    def make(*a, **k):
        est = GradientNormEstimator(*a, **k)
        if chunk is not None:
            est.fixed_chunk = chunk
        return est

    return make


def assert_matches_golden(got, golden):
    """Counts exactly, maxima within GOLDEN_RTOL relative (NaN where the file has NaN)."""
    assert set(got) == set(golden)
    for key, value in golden.items():
        assert got[key].shape == value.shape, key
        if key.endswith(tuple(f"__{k}" for k in COUNT_KEYS)):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], value, rtol=GOLDEN_RTOL, atol=0, err_msg=key)


@pytest.fixture(scope="module")
def per_iteration_runs():
    """The reference: one iteration per compiled call, one host copy per iteration."""
    return _flatten(_golden_runs(_chunked(1)))


def test_per_iteration_runs_match_the_golden_file(per_iteration_runs):
    golden = _load_golden()
    assert_matches_golden(per_iteration_runs, golden)
    # The golden values are real statistics, not placeholders.
    assert np.all(golden["tf_l2__grad"] > 0) and np.all(golden["shm_l2__slope"] > 0)
    assert np.all(golden["tf_l2__zero"] == 0)


@pytest.mark.parametrize("chunk", [None, 3, NITERS])
def test_chunked_iterations_equal_the_per_iteration_runs_bit_for_bit(chunk, per_iteration_runs):
    """The same points, the same kernels, one copy per chunk: the same bits."""
    got = _flatten(_golden_runs(_chunked(chunk)))
    assert set(got) == set(per_iteration_runs)
    for key, value in per_iteration_runs.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_the_golden_comparison_tolerates_an_ulp_and_no_more():
    """One float32 ulp on one stored maximum passes; 1e-4 relative fails; a count off by one fails."""
    golden = _load_golden()
    key = "tf_l2__slope"
    for moved, passes in ((np.nextafter(np.float32(golden[key].flat[3]), np.float32(np.inf)), True),
                          (golden[key].flat[3] * (1 + 1e-4), False)):
        stored = {k: v.copy() for k, v in golden.items()}
        stored[key].flat[3] = moved
        if passes:
            assert_matches_golden(golden, stored)
        else:
            with pytest.raises(AssertionError):
                assert_matches_golden(golden, stored)
    stored = {k: v.copy() for k, v in golden.items()}
    stored["tf_l2__zero"].flat[0] += 1
    with pytest.raises(AssertionError):
        assert_matches_golden(golden, stored)


def test_sync_every_puts_chunk_boundaries_on_multiples():
    """With sync_every=k no chunk runs past an iteration i with (i+1) % k == 0."""
    from estimate_gradient_norm import GradientNormEstimator

    est = GradientNormEstimator(_model(), SHAPE, BATCH)
    est.fixed_chunk = 4
    sampler = BallSampler.create("l2")
    seen = []
    gen = est.iterate(_x0(), 0, TARGETS, NSAMPS, 9, SEED, IMG, sampler, sync_every=3)
    for st in gen:
        seen.append(st.iteration)
    assert seen == list(range(9))
    assert all(end % 3 == 0 or end == 9 for end in est.last_chunk_ends)
    assert max(b - a for a, b in zip([0] + est.last_chunk_ends, est.last_chunk_ends)) <= 3


def test_a_later_run_starts_at_the_chunk_length_its_predecessor_measured(monkeypatch):
    """The first (image, target) ramps up from a chunk of 1; the next one on the same
    compiled loop starts at the length the measured time per iteration allows, and
    draws the same points (results do not depend on the chunking).

    The chunk target time is pinned so the lengths do not depend on this machine's
    speed: with an hour per chunk any measured time allows MAX_CHUNK, with a
    picosecond none allows more than one iteration."""
    import estimate_gradient_norm
    from estimate_gradient_norm import MAX_CHUNK, GradientNormEstimator

    monkeypatch.setattr(estimate_gradient_norm, "CHUNK_SECONDS", 3600.0)
    est = GradientNormEstimator(_model(), SHAPE, BATCH)
    sampler = BallSampler.create("l2")
    first = list(est.iterate(_x0(), 0, TARGETS, NSAMPS, 40, SEED, IMG, sampler))
    assert est.last_chunk_ends == [1, 5, 21, 40]  # chunks of 1, 4, 16 (4x each), then the rest
    second = list(est.iterate(_x0(), 0, TARGETS, NSAMPS, 40, SEED, IMG, sampler))
    assert est.last_chunk_ends == [40] and MAX_CHUNK >= 40
    np.testing.assert_array_equal(np.stack([s.grad_max for s in first]),
                                  np.stack([s.grad_max for s in second]))
    # Another number of targets is another compiled loop: it ramps up from 1 again.
    list(est.iterate(_x0(), 0, TARGETS[:1], NSAMPS, 3, SEED, IMG, sampler))
    assert est.last_chunk_ends[0] == 1

    # A measured time that allows one iteration per chunk keeps every chunk at 1.
    monkeypatch.setattr(estimate_gradient_norm, "CHUNK_SECONDS", 1e-12)
    slow = GradientNormEstimator(_model(), SHAPE, BATCH)
    third = list(slow.iterate(_x0(), 0, TARGETS, NSAMPS, 6, SEED, IMG, sampler))
    assert slow.last_chunk_ends == [1, 2, 3, 4, 5, 6]
    list(slow.iterate(_x0(), 0, TARGETS, NSAMPS, 6, SEED, IMG, sampler))
    assert slow.last_chunk_ends == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(np.stack([s.grad_max for s in third]),
                                  np.stack([s.grad_max for s in first[:6]]))


def test_closing_the_generator_early_stops_the_pool_stream():
    from estimate_gradient_norm import GradientNormEstimator

    est = GradientNormEstimator(_model(), SHAPE, BATCH)
    sampler = BallSampler.create("l2")
    with SamplerPool(sampler, SHAPE, BATCH, 1) as pool:
        gen = est.iterate(_x0(), 0, TARGETS, NSAMPS, 50, SEED, IMG, sampler, pool)
        first = next(gen)
        gen.close()
        # The pool is usable again: a fresh stream gives the golden first iteration.
        again = next(est.iterate(_x0(), 0, TARGETS, NSAMPS, 1, SEED, IMG, sampler, pool))
    np.testing.assert_array_equal(first.grad_max, again.grad_max)


def test_ctrl_c_during_a_long_image_stops_with_130_and_no_partial_file(tmp_path, tanh_model_path):
    """One image of 100000 iterations with the in-graph sampler: Ctrl-C lands mid-image,
    between chunks, and the run exits 130 without a file (the communicate() timeout is
    a hang guard, not a timing assertion)."""
    import signal
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "collect_gradients.py"), "--model_path",
         tanh_model_path, "-N", "64", "-i", "100000", "-n", "1", "--targets", "top2",
         "--sampler", "tf", "-s", str(out_dir), "--no_progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = 0
    for line in proc.stdout:  # per-iteration lines: the chunks reach the host as they finish
        if line.startswith("[STATS][L2]"):
            seen += 1
            if seen == 50:
                break
    assert seen == 50, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    files = [os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs]
    assert files == []  # neither a .mat nor a temporary .part


if __name__ == "__main__" and "--write" in sys.argv:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from estimate_gradient_norm import GradientNormEstimator

    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez(GOLDEN, **_flatten(_golden_runs(GradientNormEstimator)))
    print("wrote", GOLDEN)
