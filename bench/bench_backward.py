"""Cost of one backward pass in forward passes, for the stage-1 gradient.

The README explains the 9-class / 1-class stage-1 ratio by the backward
passes (one per target class) and quotes their cost in forward passes. This
script measures it on the digits 7-layer CNN (MNIST layout 28 x 28 x 1,
random weights unless ``--model`` names a file: the cost does not depend on
the weights), with two compiled functions on the same batch of points:

* forward: the logits of the batch;
* forward + backward: the logits and the input gradient of one logit
  difference g = f_c - f_j (what stage 1 computes per target).

Both are timed the same way (wall clock around one call, the result fetched
to the host), both warmed, rounds interleaved, minimum of each reported.
The backward cost is (forward + backward - forward) / forward.

    .venv/bin/python bench/bench_backward.py --batch 1024 --rounds 7
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from common import check_positive, run_cli  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="a Keras model file (default: the digits "
                                                "normal CNN with random weights)")
    p.add_argument("--batch", type=int, default=1024, help="points per call (default %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (default %(default)s)")
    p.add_argument("--seed", type=int, default=1215)
    args = p.parse_args(argv)
    check_positive("--batch", args.batch)
    check_positive("--rounds", args.rounds)
    return args


def main(args) -> int:
    import keras
    import tensorflow as tf

    import models

    keras.utils.set_random_seed(args.seed)
    if args.model:
        model = keras.saving.load_model(args.model, compile=False)
        note = args.model
    else:
        model = models.build_model("normal", (28, 28, 1))
        note = "digits normal 7-layer CNN, random weights"
    shape = tuple(model.input_shape[1:])
    x = tf.constant(np.random.default_rng(args.seed).uniform(-0.5, 0.5, (args.batch,) + shape)
                    .astype(np.float32))
    c, j = 0, 1

    @tf.function
    def forward(x):
        return model(x, training=False)

    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            g = logits[:, c] - logits[:, j]
        return logits, tape.gradient(g, x)

    def timed(fn):
        start = time.perf_counter()
        out = fn(x)
        _ = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        return time.perf_counter() - start

    timed(forward), timed(forward_backward)  # trace and warm both
    fwd, both = [], []
    for _ in range(args.rounds):
        fwd.append(timed(forward))
        both.append(timed(forward_backward))
    f, fb = min(fwd), min(both)
    print(f"# model: {note}; batch {args.batch}; {args.rounds} interleaved rounds, minimum; "
          f"tensorflow {tf.__version__}, cpu threads {os.cpu_count()}")
    print(f"# command: {' '.join([os.path.basename(sys.argv[0])] + list(sys.argv[1:]))}")
    print(f"forward: {f * 1e3:.1f} ms; forward + backward: {fb * 1e3:.1f} ms")
    print(f"backward / forward cost: {(fb - f) / f:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
