"""BPDA (docs/format.md): the model is evaluated at T(clip(x0 + delta)), clipped again, where
delta are drawn in the ball around the UNtransformed x0; the gradient there stands for the
gradient at x0 + delta."""
import numpy as np
import pytest
import scipy.io

import defense
from common import derived_seed
from randsphere import TRANSFORM_STREAM, BallSampler, SamplerPool


def _reduce_by_hand(points):
    """3-bit reduction of points in the data range, written out: (uint8(x*255) >> 5) << 5."""
    pixels = (np.clip(points + np.float32(0.5), 0, 1) * np.float32(255)).astype(np.uint8)
    return ((pixels >> 5) << 5).astype(np.float32) / np.float32(255) - np.float32(0.5)


def _deltas(sampler, parts, n, dim):
    return sampler.draw(np.random.default_rng(derived_seed(*parts)), n, dim)


def _stream(sampler, x0, jobs, transform, nworkers=1):
    with SamplerPool(sampler, x0.shape, max(n for _, n in jobs), nworkers=nworkers,
                     transform=transform) as pool:
        return [b.copy() for b in pool.stream(x0, jobs)]


def test_workers_send_the_transformed_samples_around_the_untransformed_x0():
    sampler = BallSampler.create("l2", 2.0)
    x0 = np.random.default_rng(1).uniform(-0.5, 0.5, (8, 8, 1)).astype(np.float32)
    jobs = [((7, 3, it, p), 32) for it in range(2) for p in range(2)]
    got = _stream(sampler, x0, jobs, "defend_reduce")
    flat = x0.reshape(1, -1)
    t_x0 = _reduce_by_hand(x0).reshape(1, -1)
    assert np.abs(t_x0 - flat).max() > 0.05  # T moves x0: the two centres differ
    for (parts, n), batch in zip(jobs, got):
        delta = _deltas(sampler, parts, n, flat.shape[1])
        assert np.all(np.linalg.norm(delta.astype(np.float64), axis=1) <= 2.0 + 1e-5)
        expected = _reduce_by_hand(np.clip(flat + delta, -0.5, 0.5)).reshape(batch.shape)
        np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-6)
        # Neither the untransformed samples nor samples drawn around T(x0).
        assert not np.allclose(batch, np.clip(flat + delta, -0.5, 0.5).reshape(batch.shape))
        around_tx0 = _reduce_by_hand(np.clip(t_x0 + delta, -0.5, 0.5)).reshape(batch.shape)
        assert np.abs(batch - around_tx0).max() > 0.1


def test_tv_in_the_workers_is_seeded_by_the_job_whatever_the_worker_count():
    sampler = BallSampler.create("li", 0.1)
    x0 = np.random.default_rng(2).uniform(-0.5, 0.5, (10, 10, 1)).astype(np.float32)
    jobs = [((11, 4, it, 0), 6) for it in range(3)]
    one = _stream(sampler, x0, jobs, "defend_tv", nworkers=1)
    two = _stream(sampler, x0, jobs, "defend_tv", nworkers=2)
    for (parts, n), a, b in zip(jobs, one, two):
        np.testing.assert_array_equal(a, b)
        raw = np.clip(x0.reshape(1, -1) + _deltas(sampler, parts, n, x0.size), -0.5, 0.5)
        raw = raw.reshape(a.shape)
        mask_rng = np.random.default_rng(derived_seed(*parts, TRANSFORM_STREAM))
        expected = defense.apply_transform("defend_tv", raw, rng=mask_rng)
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)
        assert np.abs(a - raw).max() > 0.05  # the transformation was applied


def _tanh_gradient_maxima(points, w, b, c, j):
    """Max over points of the L1, L2, L-inf norms of grad (tanh z_c - tanh z_j), z = x w + b."""
    x = points.reshape(len(points), -1).astype(np.float64)
    t = np.tanh(x @ w + b)
    grad = (1 - t[:, [c]] ** 2) * w[:, c] - (1 - t[:, [j]] ** 2) * w[:, j]
    return np.array([np.abs(grad).sum(1).max(), np.linalg.norm(grad, axis=1).max(),
                     np.abs(grad).max(1).max()])


def test_stage1_gradients_are_taken_at_the_transformed_samples(tmp_path, tanh_model_path,
                                                               linear_weights):
    """On a model whose gradient varies with x, the stored maxima are those at
    T(clip(x0 + delta)): not at clip(x0 + delta), not around T(x0)."""
    import collect_gradients
    import models

    seed, nsamps, niters = 1215, 16, 3
    args = collect_gradients.parse_args(
        ["--model_path", tanh_model_path, "-N", str(nsamps), "-b", str(nsamps), "-i", str(niters),
         "-n", "2", "--targets", "top2", "--transform", "defend_reduce", "--sampler", "shm",
         "--seed", str(seed), "-s", str(tmp_path), "-q", "--no_progress"])
    assert collect_gradients.main(args) == 0
    files = sorted(tmp_path.rglob("*.mat"))
    assert files
    w, b = (np.asarray(a, np.float64) for a in linear_weights)
    data = models.load_dataset("digits")
    sampler = BallSampler.create("l2")
    for path in files:
        d = scipy.io.loadmat(str(path))
        c, j, img = d["true_label"].item(), d["target_label"].item(), d["id"].item()
        stored = np.stack([d[k].ravel() for k in ("G1_max", "G2_max", "Gi_max")], axis=1)
        x0 = data.test_data[img].reshape(1, -1)
        tx0 = defense.apply_transform("defend_reduce", data.test_data[img:img + 1]).reshape(1, -1)
        want, plain, centred = [], [], []
        for it in range(niters):
            delta = _deltas(sampler, (seed, img, it, 0), nsamps, x0.shape[1])
            pts = np.clip(x0 + delta, -0.5, 0.5)
            want.append(_tanh_gradient_maxima(_reduce_by_hand(pts), w, b, c, j))
            plain.append(_tanh_gradient_maxima(pts, w, b, c, j))
            centred.append(_tanh_gradient_maxima(
                _reduce_by_hand(np.clip(tx0 + delta, -0.5, 0.5)), w, b, c, j))
        np.testing.assert_allclose(stored, np.array(want), rtol=2e-4)
        # The check discriminates: skipping T, or sampling around T(x0), gives other maxima.
        for other in (plain, centred):
            assert np.abs(np.array(other) / stored - 1).max() > 1e-2
