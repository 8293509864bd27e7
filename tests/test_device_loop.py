"""Stage 1 with many iterations per compiled call gives today's numbers.

``tests/data/stage1_golden.npz`` was written by ``_golden_runs`` with the
per-batch estimator of before the chunked loop (one ``tf.function`` call per
model batch, one host copy per iteration), on a tiny model with fixed weights.
The chunked estimator must reproduce it bit for bit, for the in-graph sampler
and for the shared-memory pool, whatever the chunk length.

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


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_chunked_iterations_equal_the_golden_file(chunk):
    """Bit for bit: the same points, the same kernels, one copy per chunk."""
    from estimate_gradient_norm import GradientNormEstimator

    def make(*a, **k):
        est = GradientNormEstimator(*a, **k)
        if chunk is not None:
            est.fixed_chunk = chunk  # pin the chunk length (default: adaptive)
        return est

    golden = _load_golden()
    got = _flatten(_golden_runs(make))
    assert set(got) == set(golden)
    for key, value in golden.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The golden values are real statistics, not placeholders.
    assert np.all(golden["tf_l2__grad"] > 0) and np.all(golden["shm_l2__slope"] > 0)
    assert np.all(golden["tf_l2__zero"] == 0)


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


def test_a_later_run_starts_at_the_chunk_length_its_predecessor_measured():
    """The first (image, target) ramps up from a chunk of 1; the next one on the same
    compiled loop starts at the length the measured time per iteration allows, and
    draws the same points (results do not depend on the chunking)."""
    from estimate_gradient_norm import MAX_CHUNK, GradientNormEstimator

    est = GradientNormEstimator(_model(), SHAPE, BATCH)
    sampler = BallSampler.create("l2")
    first = list(est.iterate(_x0(), 0, TARGETS, NSAMPS, 40, SEED, IMG, sampler))
    assert est.last_chunk_ends[0] == 1
    second = list(est.iterate(_x0(), 0, TARGETS, NSAMPS, 40, SEED, IMG, sampler))
    # A tiny model takes well under a millisecond per iteration: one chunk of 40 fits.
    assert est.last_chunk_ends == [40] and MAX_CHUNK >= 40
    np.testing.assert_array_equal(np.stack([s.grad_max for s in first]),
                                  np.stack([s.grad_max for s in second]))
    # Another number of targets is another compiled loop: it ramps up from 1 again.
    list(est.iterate(_x0(), 0, TARGETS[:1], NSAMPS, 3, SEED, IMG, sampler))
    assert est.last_chunk_ends[0] == 1


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
