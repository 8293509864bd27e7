#!/usr/bin/env python3
"""Stage-1 benchmark on the MNIST 'normal' 7-layer CNN (28x28x1), one run.

Prints, all measured in this one run:
  (a) stage-1 gradients/s divided by a bare compiled GradientTape loop over
      the same number of pre-generated points (same model and batch size);
  (b) stage-1 time for the 9 untargeted classes of one image divided by 9
      times the single-target time (sharing samples and the forward pass);
  (c) peak resident memory of this process and its sampling workers;
  (d) ART's clever_t time (20 maxima of 256 points, pool_factor 20) divided
      by this toolkit's stage-1 time for the same work.

    python bench/bench_stage1.py [--nsamps 1024 --niters 20 --sampler tf|shm|both]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamps", type=int, default=1024)
    p.add_argument("--niters", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--sampler", choices=("tf", "shm", "both"), default="both")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (minimum kept)")
    p.add_argument("--skip_art", action="store_true")
    p.add_argument("--seed", type=int, default=1215)
    return p.parse_args(argv)


def _model_and_image(seed):
    import models

    path = os.path.join("models", "mnist.keras")
    if os.path.exists(path):
        model, how = models.load_model("mnist", "normal"), "trained models/mnist.keras"
    else:
        import keras

        keras.utils.set_random_seed(seed)
        model, how = models.build_model("normal", (28, 28, 1)), "random weights"
    x0 = np.random.default_rng(seed).uniform(-0.5, 0.5, (28, 28, 1)).astype(np.float32)
    return model, how, x0


def _stage1_seconds(est, x0, c, targets, nsamps, niters, sampler, pool, seed):
    t0 = time.perf_counter()
    for _ in est.iterate(x0, c, targets, nsamps, niters, seed, 0, sampler, pool):
        pass
    return time.perf_counter() - t0


def _bare_seconds(model, points, c, j):
    import tensorflow as tf

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            g = logits[:, c] - logits[:, j]
        return tape.gradient(g, x)

    grad(points[0]).numpy()  # trace and compile outside the timing
    t0 = time.perf_counter()
    for x in points:
        out = grad(x)
    out.numpy()
    return time.perf_counter() - t0


def _peak_rss_mib(pid="self"):
    """Peak resident set (VmHWM) of a process, MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _art_clever_t(model, x0, c, j, nb_batches, batch_size, radius, seed):
    """ART's clever_t on a TensorFlowV2Classifier; None when ART is missing."""
    try:
        from art.estimators.classification import TensorFlowV2Classifier
        from art.metrics import clever_t
    except ImportError:
        return None
    import tensorflow as tf

    class IntLabelClassifier(TensorFlowV2Classifier):
        # ART 1.20.1's clever_t passes a NumPy integer label, which
        # TensorFlowV2Classifier.class_gradient rejects with a TypeError.
        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            if isinstance(label, np.integer):
                label = int(label)
            return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)

    clf = IntLabelClassifier(model=model, nb_classes=10, input_shape=(28, 28, 1),
                             loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
                             clip_values=(-0.5, 0.5))
    np.random.seed(seed)
    t0 = time.perf_counter()
    score = clever_t(clf, x0, j, nb_batches=nb_batches, batch_size=batch_size, radius=radius,
                     norm=2, pool_factor=20)
    return time.perf_counter() - t0, score


def main(args):
    import tensorflow as tf

    from estimate_gradient_norm import GradientNormEstimator
    from randsphere import BallSampler, SamplerPool

    model, how, x0 = _model_and_image(args.seed)
    logits = model(x0[None]).numpy()[0]
    c, j = int(np.argmax(logits)), int(np.argsort(logits)[-2])
    others = [k for k in range(10) if k != c]
    sampler = BallSampler.create("l2")
    est = GradientNormEstimator(model, (28, 28, 1), args.batch_size)
    n_grad = args.nsamps * args.niters
    print(f"model: MNIST normal 7-layer CNN ({how}); N_s x N_b = {args.nsamps} x {args.niters}, "
          f"batch {args.batch_size}, TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores")

    rng = np.random.default_rng(args.seed)
    points = [tf.constant(sampler.points(rng, x0, args.batch_size))
              for _ in range(n_grad // args.batch_size)]
    samplers = ("tf", "shm") if args.sampler == "both" else (args.sampler,)
    results = {}
    worker_peak = None
    for name in samplers:
        pool = (SamplerPool(sampler, (28, 28, 1), args.batch_size, nworkers=1)
                if name == "shm" else None)
        try:
            # Warm up: trace and compile both the 1-target and the 9-target functions.
            _stage1_seconds(est, x0, c, [j], args.nsamps, 1, sampler, pool, args.seed)
            _stage1_seconds(est, x0, c, others, args.nsamps, 1, sampler, pool, args.seed)
            # Interleaved rounds, minimum of each: other load on the machine drifts over
            # minutes and must not favour whichever measurement ran in a quiet moment.
            bare = single = multi = float("inf")
            for _ in range(args.rounds):
                bare = min(bare, _bare_seconds(model, points, c, j))
                single = min(single, _stage1_seconds(est, x0, c, [j], args.nsamps, args.niters,
                                                     sampler, pool, args.seed))
                multi = min(multi, _stage1_seconds(est, x0, c, others, args.nsamps, args.niters,
                                                   sampler, pool, args.seed))
            if pool is not None:
                worker_peak = max(_peak_rss_mib(pid) for pid in pool.pids)
        finally:
            if pool is not None:
                pool.close()
        results[name] = single
        print(f"\n[sampler {name}]")
        print(f"  bare GradientTape loop: {n_grad / bare:10.0f} gradients/s ({bare:.2f} s)")
        print(f"  stage 1, one target:    {n_grad / single:10.0f} gradients/s ({single:.2f} s)")
        print(f"  (a) stage-1 / bare throughput ratio:      {bare / single:.3f}  (target >= 0.9)")
        print(f"  stage 1, 9 targets:     {multi:.2f} s")
        print(f"  (b) 9-target time / (9 x single time):    {multi / (9 * single):.3f}  "
              "(target <= 0.6)")
    print(f"\n(c) peak resident memory: {_peak_rss_mib():.0f} MiB (main process)"
          + (f", {worker_peak:.0f} MiB (largest sampling worker)" if worker_peak else ""))

    if not args.skip_art:
        nb, bs = 20, 256
        art = _art_clever_t(model, x0, c, j, nb, bs, 3.0, args.seed)
        if art is None:
            print("\n(d) skipped: the Adversarial Robustness Toolbox is not installed "
                  "(pip install adversarial-robustness-toolbox)")
        else:
            small = GradientNormEstimator(model, (28, 28, 1), bs)
            best = min(samplers, key=results.get)
            pool = SamplerPool(sampler, (28, 28, 1), bs, 1) if best == "shm" else None
            try:
                _stage1_seconds(small, x0, c, [j], bs, 1, sampler, pool, args.seed)
                ours = _stage1_seconds(small, x0, c, [j], bs, nb, sampler, pool, args.seed)
            finally:
                if pool is not None:
                    pool.close()
            print(f"\n(d) ART 1.20.1 clever_t ({nb} batches of {bs}, pool_factor 20; its "
                  f"class_gradient label converted to a Python int in a wrapper): {art[0]:.2f} s; "
                  f"this toolkit, same work (sampler {best}): {ours:.2f} s; "
                  f"ratio ART / ours = {art[0] / ours:.1f}  (target >= 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
