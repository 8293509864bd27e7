#!/usr/bin/env python3
"""Stage-1 benchmark on an ImageNet network (issue 6): gradients per second.

Measures, on MobileNet v1 width 1.0 at 224 x 224 with random weights (default):
  (a) stage 1 (``GradientNormEstimator.iterate`` with the in-graph sampler,
      one target, N_s = 32 points per iteration, N_b = 4 iterations, model
      batch 32) against the reference of ``bench/stage1_reference.py``: the
      same iterations in one compiled call, drawing the same points from the
      same seeds and computing the same norms (it leaves out only the NaN and
      zero-gradient counts and the per-iteration host copies). Both sides are
      timed by the wall clock around the whole N_s x N_b unit of work, both
      warmed (traced and compiled) first, in interleaved rounds; the minimum
      of each is kept. Ratio = reference time / stage-1 time (target >= 0.9).
  (b) the peak resident memory of each side (``resource.getrusage``), each
      run once in its own process so that one does not inflate the other's.

    python bench/bench_imagenet.py [--rounds 3 --nsamps 32 --niters 4 --size 224]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

RESULT_TAG = "BENCH_RESULT "


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v1_1.0", help="a Keras zoo name")
    p.add_argument("--size", type=int, default=224, help="input side")
    p.add_argument("--nsamps", type=int, default=32, help="N_s, samples per batch")
    p.add_argument("--niters", type=int, default=4, help="N_b, batches")
    p.add_argument("--batch_size", type=int, default=32, help="model batch size")
    p.add_argument("--part", choices=("both", "reference", "stage1"), default="both",
                   help="both: the timing; reference/stage1: one side's peak memory (internal)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (minimum kept)")
    p.add_argument("--no_memory", action="store_true", help="skip the per-process peak RSS")
    p.add_argument("--jit", action="store_true", help="XLA-compile both sides")
    p.add_argument("--seed", type=int, default=1215)
    return p.parse_args(argv)


def _peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model(args):
    import keras

    import setup_imagenet

    keras.utils.set_random_seed(args.seed)
    return setup_imagenet.get_model(args.model, "random", args.size)


def _image(args) -> np.ndarray:
    """A smooth synthetic RGB image in [-0.5, 0.5], [S, S, 3]."""
    yy, xx = np.mgrid[0:args.size, 0:args.size] / float(args.size)
    img = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=-1)
    return (0.45 * img).astype(np.float32)


def _sides(args):
    """(reference, stage 1): zero-argument callables doing the same N_s x N_b work."""
    from estimate_gradient_norm import GradientNormEstimator
    from randsphere import BallSampler
    from stage1_reference import reference_loop

    model = _model(args)
    x0 = _image(args)
    logits = model(x0[None], training=False).numpy()[0]
    c, j = int(np.argmax(logits)), int(np.argsort(logits)[-2])
    sampler = BallSampler.create("l2")
    ref = reference_loop(model, sampler, x0, c, j, args.nsamps, args.batch_size, args.niters,
                         args.seed, args.jit)
    est = GradientNormEstimator(model, x0.shape, args.batch_size, jit_compile=args.jit)

    def stage1():
        return np.stack([st.grad_max[0] for st in est.iterate(
            x0, c, [j], args.nsamps, args.niters, args.seed, 0, sampler)])

    return ref, stage1


def _wall(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(args) -> dict:
    """Both sides in this process: warmed, interleaved rounds, minimum wall time of each."""
    ref, stage1 = _sides(args)
    _, a = _wall(ref)       # warm: trace and compile
    _, b = _wall(stage1)
    # The same work: the same points give the same maxima (up to float32 rounding).
    np.testing.assert_allclose(a, b, rtol=1e-4)
    best = {"reference": float("inf"), "stage1": float("inf")}
    for _ in range(args.rounds):
        best["reference"] = min(best["reference"], _wall(ref)[0])
        best["stage1"] = min(best["stage1"], _wall(stage1)[0])
    return best


def peak(args, part) -> dict:
    """Peak RSS of one side alone: warm-up then one timed run."""
    fn = _sides(args)[0 if part == "reference" else 1]
    fn()
    seconds, _ = _wall(fn)
    return {"part": part, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def _child(args, part) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--model", args.model,
           "--size", str(args.size), "--nsamps", str(args.nsamps), "--niters", str(args.niters),
           "--batch_size", str(args.batch_size), "--seed", str(args.seed)] + (
               ["--jit"] if args.jit else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise SystemExit(f"{part} part failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def main(args) -> int:
    if args.part in ("reference", "stage1"):
        print(RESULT_TAG + json.dumps(peak(args, args.part)), flush=True)
        return 0
    grads = args.nsamps * args.niters
    print(f"model: {args.model} at {args.size}x{args.size}, random weights; N_s x N_b = "
          f"{args.nsamps} x {args.niters}, batch {args.batch_size}, {os.cpu_count()} CPU cores; "
          f"best of {args.rounds} interleaved rounds, wall clock on both sides"
          + (", XLA" if args.jit else ""))
    best = measure(args)
    print(f"reference (one compiled call): {grads / best['reference']:.4g} gradients/s "
          f"({best['reference']:.2f} s)")
    print(f"stage 1 (iterate, sampler tf): {grads / best['stage1']:.4g} gradients/s "
          f"({best['stage1']:.2f} s)")
    print(f"ratio stage 1 / reference = {best['reference'] / best['stage1']:.3f} (target >= 0.9)")
    if not args.no_memory:
        mem = {part: _child(args, part)["peak_rss_mib"] for part in ("reference", "stage1")}
        print(f"peak RSS, each side alone in its own process: reference {mem['reference']:.0f} "
              f"MiB, stage 1 {mem['stage1']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
