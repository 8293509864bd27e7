#!/usr/bin/env python3
"""ART's clever_t against this toolkit as whole processes, at the paper's batch size.

Each round starts both sides cold, as a user runs them (Python, the TensorFlow
import and the model load included), on the same digits model and test image,
one target (the runner-up class, top2), L2 norm, radius 3:

  toolkit  collect_gradients.py -d digits --model_path M -n 1 --targets top2
           -N BS -i NB --sample_norm l2 -s TMP --overwrite -q --no_progress,
           then clever.py on that folder (stage 1 and stage 2)
  ART      this script --child art: TensorFlowV2Classifier around the same
           model, clever_t(classifier, x0, target, nb_batches=NB,
           batch_size=BS, radius=3, norm=2, pool_factor=PF), which samples,
           takes gradients and fits the reverse Weibull law

Prints each side's minimum wall time over interleaved rounds and ART / toolkit.
The in-process comparison (both sides warmed, ART's fit left out) is
bench/bench_stage1.py (d).

    python bench/bench_art.py [--niters 100 --nsamps 1024 --pool_factor 10 --rounds 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RADIUS = 3.0  # collect_gradients.py's default for --sample_norm l2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--niters", type=int, default=100, help="batches (N_b, ART's nb_batches)")
    p.add_argument("--nsamps", type=int, default=1024, help="points per batch (N_s)")
    p.add_argument("--pool_factor", type=int, default=10, help="ART's pool_factor (its default)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (minimum kept)")
    p.add_argument("--model", default=os.path.join(ROOT, "models", "digits.keras"),
                   help="digits model (trained with train_models.py when missing)")
    p.add_argument("--image", type=int, default=0, help="digits test image")
    p.add_argument("--child", choices=("art",), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def art_child(args) -> int:
    """One cold ART run; prints its CLEVER score."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier
    from art.metrics.metrics import clever_t

    import models

    class IntLabelClassifier(TensorFlowV2Classifier):
        # ART 1.20.1's clever_t passes a NumPy integer label, which
        # TensorFlowV2Classifier.class_gradient rejects with a TypeError.
        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            if isinstance(label, np.integer):
                label = int(label)
            return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)

    data = models.load_dataset("digits")
    model = models.load_model_file(args.model)
    x0 = data.test_data[args.image]
    logits = model(x0[None]).numpy()[0]
    target = int(np.argsort(logits)[-2])
    clf = IntLabelClassifier(model=model, nb_classes=logits.size, input_shape=x0.shape,
                             loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
                             clip_values=(-0.5, 0.5))
    np.random.seed(1215)
    score = clever_t(clf, x0, target, nb_batches=args.niters, batch_size=args.nsamps,
                     radius=RADIUS, norm=2, pool_factor=args.pool_factor)
    print(f"ART clever_t: image {args.image}, target {target}, L2 score {score:.5g}")
    return 0


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench_art.py: error: {' '.join(cmd[:3])} ... exited {proc.returncode}:\n"
                 + proc.stderr[-2000:])
    return wall, proc.stdout


def main(args) -> int:
    if args.child == "art":
        return art_child(args)
    py = sys.executable
    if not os.path.exists(args.model):
        subprocess.run([py, "train_models.py", "--dataset", "digits", "--models", "normal",
                        "--models_dir", os.path.dirname(args.model)], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.splitext(os.path.basename(args.model))[0]
        stage1 = [py, "collect_gradients.py", "-d", "digits", "--model_path", args.model,
                  "-f", str(args.image), "-n", "1", "--targets", "top2",
                  "-N", str(args.nsamps), "-i", str(args.niters), "--sample_norm", "l2",
                  "--radius", str(RADIUS), "-s", tmp, "--overwrite", "-q", "--no_progress"]
        stage2 = [py, "clever.py", os.path.join(tmp, f"digits_{stem}")]
        art = [py, os.path.abspath(__file__), "--child", "art", "--model", args.model,
               "--image", str(args.image), "--niters", str(args.niters),
               "--nsamps", str(args.nsamps), "--pool_factor", str(args.pool_factor)]
        best = {"toolkit": float("inf"), "ART": float("inf")}
        for r in range(args.rounds):  # interleaved: drifting load hits both sides alike
            t1, _ = _timed(stage1)
            t2, out2 = _timed(stage2)
            t3, out3 = _timed(art)
            best["toolkit"] = min(best["toolkit"], t1 + t2)
            best["ART"] = min(best["ART"], t3)
            print(f"round {r + 1}: toolkit {t1:.1f} s stage 1 + {t2:.1f} s stage 2, "
                  f"ART {t3:.1f} s", flush=True)
    ours = [ln for ln in out2.splitlines() if ln.startswith("[STATS][L0]")]
    print(f"whole processes, digits model {args.model}, image {args.image}, top2, L2, radius "
          f"{RADIUS:g}, {args.niters} batches of {args.nsamps}, ART pool_factor "
          f"{args.pool_factor}, best of {args.rounds} interleaved rounds:")
    print("  " + (ours[0] if ours else "(no toolkit [STATS][L0] line)"))
    print("  " + out3.strip())
    print(f"  toolkit {best['toolkit']:.1f} s, ART {best['ART']:.1f} s, "
          f"ratio ART / toolkit = {best['ART'] / best['toolkit']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
