#!/usr/bin/env python3
"""Stage-1 benchmark: stage 1 against the work it must do, on 28x28x1 inputs.

Prints, all measured in this one process, each figure the minimum over
interleaved rounds (both sides warmed: traced and compiled before timing;
every time is the wall clock around the same unit of work, results on the
host):
  (a) for a linear 784 -> 10 model, the 2-layer MLP (1024 softplus units)
      and the MNIST 7-layer CNN: stage 1 (``GradientNormEstimator.iterate``,
      one target) divided by a reference that runs every iteration in ONE
      compiled call (sampling, clip, forward, backward, the three norms,
      maxima; one host copy at the end) -- the same sampling and norm
      formulas (tf_draw from the same seeds; L2 scaled by L-inf as stage 1
      does) and nothing else (no NaN or zero-gradient counts).
      Ratio = reference time / stage-1 time (target >= 0.9).
  (b) CNN: stage-1 time for the 9 targets of one image divided by 9 times
      the one-target time (sharing samples and the forward pass; <= 0.6).
  (c) peak resident memory of this process (and of a sampling worker, with
      --sampler shm/both).
  (d) ART's clever_t on the CNN, warmed like ours, its Weibull fit and its
      predictions timed separately and left out, divided by this toolkit's
      stage-1 time for the same gradients, at two sizes (--art): "small", 20
      batches of 256 points with pool_factor 20 (target >= 5), and "paper",
      the paper's 100 batches of 1024 points with ART's default pool_factor
      10. bench/bench_art.py compares the two as whole processes.
  (e) with --compare_jit: stage 1 (one target) with the default kernels
      against stage 1 with --jit_compile (XLA), interleaved in the same run.

    python bench/bench_stage1.py [--rounds 5 --sampler tf|shm|both --skip_art --compare_jit
                                  --art small paper --art_rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from stage1_reference import reference_loop  # noqa: E402  (bench/, next to this file)

MODELS = ("linear", "2-layer", "normal")
#: ART comparison sizes: (batches, points per batch, ART's pool_factor).
ART_SIZES = {"small": (20, 256, 20), "paper": (100, 1024, 10)}
LABELS = {"linear": "linear 784 -> 10", "2-layer": "2-layer MLP, 1024 softplus",
          "normal": "7-layer CNN"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamps", type=int, default=1024)
    p.add_argument("--niters", type=int, nargs=3, default=[400, 40, 12],
                   metavar=("LINEAR", "MLP", "CNN"),
                   help="iterations per timed run for each model (about a second or more each)")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--sampler", choices=("tf", "shm", "both"), default="tf",
                   help="stage 1's sampler (the reference always samples in the graph)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (minimum kept)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--jit_compile", action="store_true", help="XLA for stage 1 and the reference")
    p.add_argument("--compare_jit", action="store_true",
                   help="also time stage 1 with --jit_compile (XLA), interleaved with the default "
                        "kernels (sampler tf), and print default / XLA throughput (XLA draws other "
                        "points: same amount of work, not the same points)")
    p.add_argument("--precision", default="float32")
    p.add_argument("--skip_art", action="store_true")
    p.add_argument("--art", nargs="+", choices=tuple(ART_SIZES), default=list(ART_SIZES),
                   help="sizes of the ART comparison (d): " + "; ".join(
                       f"{k}: {nb} batches of {bs}, pool_factor {pf}"
                       for k, (nb, bs, pf) in ART_SIZES.items()))
    p.add_argument("--art_rounds", type=int, default=3,
                   help="interleaved rounds of the ART comparison (minimum kept)")
    p.add_argument("--seed", type=int, default=1215)
    return p.parse_args(argv)


def _build(name, seed):
    import keras

    import models

    keras.utils.set_random_seed(seed)
    if name == "linear":
        inp = keras.Input((28, 28, 1))
        return keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp))), "random"
    path = os.path.join("models", "mnist.keras" if name == "normal" else "mnist_2layer.keras")
    if os.path.exists(path):
        return models.load_model("mnist", name), "trained " + path
    return models.build_model(name, (28, 28, 1)), "random weights"


def _wall(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stage1(est, x0, c, targets, nsamps, niters, sampler, pool, seed):
    def run():  # maxima [niters, 3] of the first target, on the host
        return np.stack([st.grad_max[0] for st in est.iterate(x0, c, targets, nsamps, niters,
                                                               seed, 0, sampler, pool)])
    return run


def _peak_rss_mib(pid="self"):
    """Peak resident set (VmHWM) of a process, MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _art(model, x0, c, j, batch_size, pool_factor, radius, seed):
    """ART's clever_t, warmed; returns (total s, fit s, predict s) or None without ART."""
    try:
        import art.metrics.metrics as art_metrics
        from art.estimators.classification import TensorFlowV2Classifier
    except ImportError:
        return None
    import tensorflow as tf

    spent = {"fit": 0.0, "predict": 0.0}

    class IntLabelClassifier(TensorFlowV2Classifier):
        # ART 1.20.1's clever_t passes a NumPy integer label, which
        # TensorFlowV2Classifier.class_gradient rejects with a TypeError.
        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            if isinstance(label, np.integer):
                label = int(label)
            return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)

        def predict(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return super().predict(*a, **k)
            finally:
                spent["predict"] += time.perf_counter() - t0

    class TimedWeibull:  # stands in for scipy.stats.weibull_min inside ART's module
        def __init__(self, dist):
            self.dist = dist

        def fit(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return self.dist.fit(*a, **k)
            finally:
                spent["fit"] += time.perf_counter() - t0

        def __getattr__(self, name):
            return getattr(self.dist, name)

    clf = IntLabelClassifier(model=model, nb_classes=10, input_shape=(28, 28, 1),
                             loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
                             clip_values=(-0.5, 0.5))

    def run(nb):
        spent["fit"] = spent["predict"] = 0.0
        original = art_metrics.weibull_min
        art_metrics.weibull_min = TimedWeibull(original)
        np.random.seed(seed)
        t0 = time.perf_counter()
        try:
            art_metrics.clever_t(clf, x0, j, nb_batches=nb, batch_size=batch_size,
                                 radius=radius, norm=2, pool_factor=pool_factor)
            return time.perf_counter() - t0, spent["fit"], spent["predict"]
        finally:
            art_metrics.weibull_min = original
    run(2)  # warm: the first gradient and predict calls build kernels
    return run


def _compare_art(args, size, model, x0, c, j, sampler) -> bool:
    """(d) at one of ART_SIZES; False when ART is not installed."""
    from estimate_gradient_norm import GradientNormEstimator

    nb, bs, pool_factor = ART_SIZES[size]
    art_run = _art(model, x0, c, j, bs, pool_factor, 3.0, args.seed)
    if art_run is None:
        return False
    small = GradientNormEstimator(model, (28, 28, 1), bs, jit_compile=args.jit_compile,
                                  precision=args.precision)
    ours_fn = _stage1(small, x0, c, [j], bs, nb, sampler, None, args.seed)
    ours_fn()  # warm
    ours = art_total = art_work = float("inf")
    fit = pred = 0.0
    for _ in range(args.art_rounds):
        total, f, p = art_run(nb)
        if total - f - p < art_work:
            art_total, art_work, fit, pred = total, total - f - p, f, p
        ours = min(ours, _wall(ours_fn))
    print(f"\n(d) {size}: ART clever_t ({nb} batches of {bs}, pool_factor {pool_factor}, "
          f"warmed; its class_gradient label converted to a Python int in a wrapper): "
          f"{art_total:.2f} s, of which Weibull fit {fit:.3f} s and predictions {pred:.3f} s "
          f"(left out) -> {art_work:.2f} s; this toolkit, the same {nb} x {bs} gradients "
          f"(sampler tf): {ours:.3f} s; ratio ART / ours = {art_work / ours:.2f}"
          + ("  (target >= 5)" if size == "small" else ""))
    return True


def main(args):
    import tensorflow as tf

    from estimate_gradient_norm import GradientNormEstimator
    from randsphere import BallSampler, SamplerPool

    sampler = BallSampler.create("l2")
    x0 = np.random.default_rng(args.seed).uniform(-0.5, 0.5, (28, 28, 1)).astype(np.float32)
    samplers = ("tf", "shm") if args.sampler == "both" else (args.sampler,)
    print(f"N_s {args.nsamps}, batch {args.batch_size}, one image, l2 sampling; "
          f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; best of {args.rounds} "
          f"interleaved rounds; precision {args.precision}"
          + (", XLA" if args.jit_compile else ""))
    niters = dict(zip(MODELS, args.niters))
    table = []
    xla_rows = []
    cnn = None
    worker_peak = None
    for name in args.models:
        model, how = _build(name, args.seed)
        logits = model(x0[None]).numpy()[0]
        c, j = int(np.argmax(logits)), int(np.argsort(logits)[-2])
        n = niters[name]
        est = GradientNormEstimator(model, (28, 28, 1), args.batch_size,
                                    jit_compile=args.jit_compile, precision=args.precision)
        ref = reference_loop(model, sampler, x0, c, j, args.nsamps, args.batch_size, n, args.seed,
                         args.jit_compile)
        pools = {s: (SamplerPool(sampler, (28, 28, 1), args.batch_size, nworkers=1)
                     if s == "shm" else None) for s in samplers}
        try:
            runs = {"reference": ref}
            for s, pool in pools.items():
                runs[f"stage1 {s}"] = _stage1(est, x0, c, [j], args.nsamps, n, sampler, pool,
                                              args.seed)
            # Like with like: XLA samples in the graph, so it is compared with sampler tf.
            if args.compare_jit and not args.jit_compile and "tf" in pools:
                xla = GradientNormEstimator(model, (28, 28, 1), args.batch_size, jit_compile=True,
                                            precision=args.precision)
                runs["stage1 xla"] = _stage1(xla, x0, c, [j], args.nsamps, n, sampler, None,
                                             args.seed)
            if name == "normal":
                others = [k for k in range(10) if k != c]
                runs["stage1 9 targets"] = _stage1(est, x0, c, others, args.nsamps, n, sampler,
                                                   pools[samplers[0]], args.seed)
            warm = {k: fn() for k, fn in runs.items()}  # trace and compile before timing
            # The same work: the reference's maxima are stage 1's (same points, same norms).
            np.testing.assert_allclose(warm["reference"], warm[f"stage1 {samplers[0]}"]
                                       if samplers[0] == "tf" else warm["reference"], rtol=1e-4)
            best = {k: float("inf") for k in runs}
            for _ in range(args.rounds):
                for k, fn in runs.items():  # interleaved: drifting load hits every side alike
                    best[k] = min(best[k], _wall(fn))
            if "shm" in pools:
                worker_peak = max(worker_peak or 0,
                                  max(_peak_rss_mib(p) for p in pools["shm"].pids))
        finally:
            for pool in pools.values():
                if pool is not None:
                    pool.close()
        grads = args.nsamps * n
        for s in samplers:
            table.append((LABELS[name] + f" ({how})", s, n, grads / best["reference"],
                          grads / best[f"stage1 {s}"], best["reference"] / best[f"stage1 {s}"]))
        if "stage1 xla" in best:
            xla_rows.append((LABELS[name], grads / best["stage1 tf"],
                             grads / best["stage1 xla"]))
        if name == "normal":
            cnn = (model, c, j, best, samplers[0])

    print("\n(a) stage 1 (one target) against every iteration in one compiled call")
    print(f"{'model':52s} {'sampler':7s} {'iters':>5s} {'reference':>12s} {'stage 1':>12s} "
          f"{'ratio':>6s}")
    for label, s, n, ref_rate, s1_rate, ratio in table:
        print(f"{label:52s} {s:7s} {n:5d} {ref_rate:10.0f}/s {s1_rate:10.0f}/s {ratio:6.3f}")
    print("   (gradients per second; ratio = reference time / stage-1 time, target >= 0.9)")
    if cnn is not None:
        model, c, j, best, s = cnn
        print(f"\n(b) CNN, 9 targets / (9 x one target), sampler {s}: "
              f"{best['stage1 9 targets'] / (9 * best['stage1 ' + s]):.3f}  (target <= 0.6)")
        # Per iteration: what every target pays (its backward pass and norms) and what
        # the targets share (sampling, forward pass); the ratio is (S + 9B) / (9 (S + B)).
        one = best["stage1 " + s] / niters["normal"] * 1e3
        nine = best["stage1 9 targets"] / niters["normal"] * 1e3
        extra = (nine - one) / 8
        print(f"    per iteration: one target {one:.0f} ms, nine {nine:.0f} ms; each extra "
              f"target B = {extra:.0f} ms, shared S = {one - extra:.0f} ms")
    print(f"\n(c) peak resident memory: {_peak_rss_mib():.0f} MiB (main process)"
          + (f", {worker_peak:.0f} MiB (sampling worker)" if worker_peak else ""))
    if xla_rows:
        print("\n(e) stage 1, one target: default kernels against --jit_compile (XLA), "
              "interleaved in this run")
        for label, default, xla in xla_rows:
            print(f"{label:52s} default {default:10.0f}/s  XLA {xla:10.0f}/s  "
                  f"default / XLA {default / xla:6.2f}")

    if not args.skip_art and cnn is not None:
        model, c, j, _, _ = cnn
        for size in args.art:
            if not _compare_art(args, size, model, x0, c, j, sampler):
                print("\n(d) skipped: the Adversarial Robustness Toolbox is not installed "
                      "(pip install adversarial-robustness-toolbox)")
                break
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
