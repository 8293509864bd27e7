#!/usr/bin/env python3
"""Stage-1 speed of --jit_compile (XLA) and --precision against the default, same work.

For each model (linear 784 -> 10 and the MNIST 7-layer CNN, random weights
unless models/ has trained ones), times ``GradientNormEstimator.iterate``
(in-graph sampler, one target) by the wall clock, each variant warmed first,
in interleaved rounds, minimum kept, and prints gradients/s and the ratio to
the default (float32, no XLA). Also prints the largest relative difference
of the maxima from the default's (XLA and float16 round differently).

    python bench/bench_precision.py [--rounds 3 --niters 100 10]
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

VARIANTS = [("float32", False), ("float32", True), ("mixed_float16", False)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamps", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--niters", type=int, nargs=2, default=[100, 6], metavar=("LINEAR", "CNN"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1215)
    return p.parse_args(argv)


def main(args):
    import tensorflow as tf

    from bench_stage1 import _build
    from estimate_gradient_norm import GradientNormEstimator
    from randsphere import BallSampler

    sampler = BallSampler.create("l2")
    x0 = np.random.default_rng(args.seed).uniform(-0.5, 0.5, (28, 28, 1)).astype(np.float32)
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"N_s {args.nsamps}, batch {args.batch_size}; TensorFlow {tf.__version__}, "
          f"{os.cpu_count()} CPU cores, {device}"
          f"; best of {args.rounds} interleaved rounds")
    for name, n in zip(("linear", "normal"), args.niters):
        model, how = _build(name, args.seed)
        logits = model(x0[None]).numpy()[0]
        c, j = int(np.argmax(logits)), int(np.argsort(logits)[-2])
        runs = {}
        for precision, jit in VARIANTS:
            est = GradientNormEstimator(model, (28, 28, 1), args.batch_size, jit_compile=jit,
                                        precision=precision)
            runs[(precision, jit)] = (lambda est=est: np.stack([
                st.grad_max[0] for st in est.iterate(x0, c, [j], args.nsamps, n, args.seed, 0,
                                                     sampler)]))
        values = {k: fn() for k, fn in runs.items()}  # warm
        best = {k: float("inf") for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        base = best[VARIANTS[0]]
        print(f"\n{name} ({how}), {n} iterations:")
        for (precision, jit), seconds in best.items():
            diff = np.max(np.abs(values[(precision, jit)] / values[VARIANTS[0]] - 1))
            print(f"  {precision:14s} {'XLA' if jit else 'no XLA':7s} "
                  f"{args.nsamps * n / seconds:10.0f} gradients/s  ratio to default "
                  f"{base / seconds:5.2f}  max rel. diff of maxima {diff:.1e}")
    # set_precision is process-wide: leave the default behind.
    tf.config.experimental.enable_tensor_float_32_execution(False)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
