"""Gradient norm of g = f_c - f_j along a Carlini-Wagner path and in the sampling ball.

The README explains BReLU CLEVER scores above the CW distortion by the
gradient norm growing along the CW path (from about 1.75 at the image to
13-17 near the decision boundary) while random points within radius 3 never
exceed 2.6. This prints those numbers for one (image, target) pair:

* ``||grad g||_2`` at x0 + t (x_adv - x0) for t = 0, 0.05, ..., 1, where
  x_adv is our targeted CW L2 adversarial example;
* the largest ``||grad g||_2`` over ``--nsamples`` points drawn like stage 1
  (the original L2 scheme, radius ``--radius``, clipped to the data range).

    .venv/bin/python bench/bench_cw_path.py --models_dir models -m brelu --image 3 --target 5

The pair of the README's figure is not recorded there; pass the image and
target to reproduce, e.g. a BReLU pair listed as exceeding CW in
``results/digits/records.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from common import ToolError, check_positive, run_cli  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", default="digits")
    p.add_argument("-m", "--model_name", default="brelu")
    p.add_argument("--models_dir", default="models")
    p.add_argument("--model_path", default=None)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--image", type=int, required=True, help="test image id")
    p.add_argument("--target", type=int, required=True, help="target class j")
    p.add_argument("--radius", type=float, default=3.0)
    p.add_argument("--nsamples", type=int, default=20480)
    p.add_argument("--iterations", type=int, default=1000, help="CW iterations per binary step")
    p.add_argument("--binary_steps", type=int, default=9)
    p.add_argument("--seed", type=int, default=1215)
    args = p.parse_args(argv)
    check_positive("--radius", args.radius)
    check_positive("--nsamples", args.nsamples)
    return args


def main(args) -> int:
    import tensorflow as tf

    import attacks
    import models
    from randsphere import BallSampler

    data = models.load_dataset(args.dataset, args.data_dir)
    model = models.load_model(args.dataset, args.model_name, model_path=args.model_path,
                              models_dir=args.models_dir)
    if not 0 <= args.image < len(data.test_data):
        raise ToolError(f"--image {args.image} is not a test image id")
    x0 = data.test_data[args.image].astype(np.float32)
    logits = np.asarray(model(x0[None], training=False))[0]
    c, j = int(np.argmax(logits)), int(args.target)
    if j == c or not 0 <= j < logits.size:
        raise ToolError(f"--target {j}: must be a class other than the predicted {c}")

    @tf.function
    def grad_norms(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=False)
            g = out[:, c] - out[:, j]
        return tf.norm(tf.reshape(tape.gradient(g, x), [tf.shape(x)[0], -1]), axis=1)

    attack = attacks.CarliniWagnerL2(model, max_iterations=args.iterations,
                                     binary_search_steps=args.binary_steps)
    res = attack(x0[None], targets=[j])
    if not res.success[0]:
        raise ToolError(f"CW found no adversarial example for image {args.image} -> {j}")
    adv = np.asarray(res.adv[0], np.float32)
    ts = np.linspace(0.0, 1.0, 21, dtype=np.float32)
    path = x0[None] + ts[:, None, None, None] * (adv - x0)[None]
    along = grad_norms(tf.constant(path)).numpy()

    sampler = BallSampler.create("l2", args.radius)
    rng = np.random.default_rng(args.seed)
    best = 0.0
    for start in range(0, args.nsamples, 1024):
        pts = sampler.points(rng, x0, min(1024, args.nsamples - start))
        best = max(best, float(grad_norms(tf.constant(pts)).numpy().max()))

    print(f"# {args.dataset} {args.model_name}, image {args.image}, class {c} -> target {j}; "
          f"CW L2 distortion {np.linalg.norm(adv - x0):.4f}")
    print("CW path ||grad g||_2 at t = "
          + ", ".join(f"{t:.2f}: {v:.3g}" for t, v in zip(ts, along)))
    print(f"at the image: {along[0]:.3g}; largest on the path: {along.max():.3g} "
          f"(t = {ts[int(np.argmax(along))]:.2f})")
    print(f"largest over {args.nsamples} stage-1 points within radius {args.radius:g}: {best:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
