#!/usr/bin/env python3
"""Stage-1 benchmark on an ImageNet network (issue 6): gradients per second.

Measures, on MobileNet v1 width 1.0 at 224 x 224 with random weights (default):
  (a) stage-1 gradients/s (``collect_gradients.main`` with ``--sampler tf``,
      N_s = 32 per batch, N_b = 4 batches, model batch 32) divided by a bare
      compiled GradientTape loop on the same model doing the same sampling
      and norms (target: at least 0.9);
  (b) the peak resident memory of each (``resource.getrusage``), each part run
      in its own process so that one does not inflate the other's peak.

    python bench/bench_imagenet.py [--part both|bare|stage1] [--nsamps 32 --niters 4]

The stage-1 part calls ``collect_gradients.main`` with ``-d imagenet -m
mobilenet_v1_1.0 --weights random -N 32 -i 5 -b 32 -n 1 --targets top2
--sampler tf``. It builds the model after seeding like the bench, so its
random weights are the bench's, and the one synthetic image is named after
that model's own prediction (a misclassified image would be skipped). The
rate is N_s x batches / the sum of the per-batch ``[STATS][L2] ... iter_time``
values; the first batch traces and compiles, like the bare loop's untimed
first call, and is left out.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
ITER_TIME = re.compile(r"^\[STATS\]\[L2\] .*iter_time = ([0-9.eE+-]+)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v1_1.0", help="a Keras zoo name")
    p.add_argument("--size", type=int, default=224, help="input side")
    p.add_argument("--nsamps", type=int, default=32, help="N_s, samples per batch")
    p.add_argument("--niters", type=int, default=4, help="N_b, batches")
    p.add_argument("--batch_size", type=int, default=32, help="model batch size")
    p.add_argument("--part", choices=("both", "bare", "stage1"), default="both")
    p.add_argument("--jit", action="store_true", help="XLA-compile the bare loop")
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


def bare(args) -> dict:
    """Gradients/s of a minimal compiled loop: sample an L2 ball, grad of f_c - f_j, norms, max.

    Sampling as the original's l2 default: a direction uniform on the sphere,
    radius U^(1/d) times a scale U[0, 3], clipped to [-0.5, 0.5].
    """
    import tensorflow as tf

    model = _model(args)
    x0 = tf.constant(_image(args))
    logits = model(x0[None], training=False).numpy()[0]
    c, j = int(np.argmax(logits)), int(np.argsort(logits)[-2])
    dim = int(np.prod(x0.shape))
    n, batch = args.nsamps, args.batch_size

    @tf.function(jit_compile=args.jit)
    def batch_max(seed):
        maxima = tf.zeros([3])
        for start in range(0, n, batch):
            m = min(batch, n - start)
            s = seed + start
            z = tf.random.stateless_normal([m, dim], [s, 1])
            u = tf.random.stateless_uniform([m, 1], [s, 2]) ** (1.0 / dim)
            r = tf.random.stateless_uniform([m, 1], [s, 3], maxval=3.0)
            delta = z / tf.norm(z, axis=1, keepdims=True) * u * r
            x = tf.clip_by_value(x0[None] + tf.reshape(delta, [m, *x0.shape]), -0.5, 0.5)
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = model(x, training=False)
                g = out[:, c] - out[:, j]
            grad = tf.reshape(tape.gradient(g, x), [m, dim])
            norms = tf.stack([tf.reduce_sum(tf.abs(grad), 1), tf.norm(grad, axis=1),
                              tf.reduce_max(tf.abs(grad), 1)], axis=1)
            maxima = tf.maximum(maxima, tf.reduce_max(norms, 0))
        return maxima

    batch_max(tf.constant(0)).numpy()  # trace and compile outside the timing
    t0 = time.perf_counter()
    for it in range(args.niters):
        out = batch_max(tf.constant(1000 * (it + 1)))
    out.numpy()
    seconds = time.perf_counter() - t0
    return {"part": "bare", "gradients": n * args.niters, "seconds": seconds,
            "grad_per_s": n * args.niters / seconds, "peak_rss_mib": _peak_rss_mib()}


def stage1(args) -> dict:
    """Gradients/s of ``collect_gradients.main`` from its per-batch iter_time lines."""
    from PIL import Image

    import collect_gradients

    model = _model(args)  # the same random weights stage 1 will build (same seed)
    img = _image(args)
    predicted = int(np.argmax(model(img[None], training=False).numpy()[0]))
    del model
    with tempfile.TemporaryDirectory(prefix="bench_imagenet_") as tmp:
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        # Names count classes from 1 (setup_imagenet.ImageNet, label_base 1).
        Image.fromarray(np.round((img + 0.5) * 255).astype(np.uint8)).save(
            os.path.join(images, f"{predicted + 1}.bench.png"))
        argv = ["-d", "imagenet", "-m", args.model, "--weights", "random",
                "-N", str(args.nsamps), "-i", str(args.niters + 1), "-b", str(args.batch_size),
                "-n", "1", "--targets", "top2", "--sampler", "tf", "-s", tmp,
                "--data_dir", images, "--seed", str(args.seed), "--no_progress"]
        import keras

        keras.utils.set_random_seed(args.seed)
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            status = collect_gradients.main(collect_gradients.parse_args(argv))
        wall = time.perf_counter() - t0
    times = [float(m.group(1)) for m in map(ITER_TIME.match, out.getvalue().splitlines()) if m]
    if status or len(times) != args.niters + 1:
        raise SystemExit(f"stage 1 exited {status} with {len(times)} iter_time lines "
                         f"(expected {args.niters + 1}); its output:\n{out.getvalue()}")
    # The first iteration traces and compiles the function, as the bare loop's untimed
    # first call does: it is the warm-up, left out of the rate.
    seconds = float(sum(times[1:]))
    return {"part": "stage1", "gradients": args.nsamps * args.niters, "seconds": seconds,
            "grad_per_s": args.nsamps * args.niters / seconds, "wall_s": wall,
            "peak_rss_mib": _peak_rss_mib()}


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
    if args.part != "both":
        result = {"bare": bare, "stage1": stage1}[args.part](args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    print(f"model: {args.model} at {args.size}x{args.size}, random weights; N_s x N_b = "
          f"{args.nsamps} x {args.niters}, batch {args.batch_size}, {os.cpu_count()} CPU cores")
    base = _child(args, "bare")
    print(f"bare loop: {base['grad_per_s']:.4g} gradients/s, peak RSS {base['peak_rss_mib']:.0f} MiB")
    st1 = _child(args, "stage1")
    print(f"stage 1:   {st1['grad_per_s']:.4g} gradients/s, peak RSS {st1['peak_rss_mib']:.0f} MiB "
          f"(whole run {st1['wall_s']:.1f} s)")
    print(f"ratio stage 1 / bare = {st1['grad_per_s'] / base['grad_per_s']:.3f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
