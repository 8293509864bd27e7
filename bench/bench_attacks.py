"""Carlini-Wagner L2 time per image: attacks.py against ART's CarliniL2Method.

Both attacks run untargeted on the same N correctly classified digits test
images (28 x 28 x 1, the MNIST layout) with the same iterations, binary search
steps, initial constant and learning rate, on the digits "normal" 7-layer CNN
(``models/digits.keras`` when it exists; otherwise the same architecture with
random weights, or briefly trained with ``--train_epochs``, which the output
says).

Both sides are timed the same way: the wall clock (``time.perf_counter``)
around one call that attacks the N images (ours: ``attack(x, labels)``; ART:
``attack.generate(x, y)``), on attack objects built before the clock starts.
The first call of each is the cold time (ours traces its tf.functions then);
then ``--rounds`` rounds run ART, ours without early abort and ours with early
abort interleaved, and the minimum of each is its warm time. ART's
CarliniL2Method has no early abort, so the like-for-like ratio is ART warm /
ours warm without early abort; all four ratios are printed, labelled.

    .venv/bin/python bench/bench_attacks.py --n 10 --iterations 100 --train_epochs 2

The default is 100 iterations, not the paper's 1000/2000: ART needed about
0.06 s per image and iteration here (2 shared CPU cores), so 10 images at
1000 iterations x 9 binary steps would take about 1.5 hours. ART's
CarliniL2Method is not the same optimiser (gradient steps with a line search
instead of Adam), so success rate and mean L2 are printed beside the times.

The Adversarial Robustness Toolbox (``adversarial-robustness-toolbox==1.20.1``)
is optional: without it only our timing is printed. Results go to stdout.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from common import Norm, check_positive, run_cli, setup_logging  # noqa: E402

log = logging.getLogger("clever.bench")

DEFAULT_MODEL = os.path.join("models", "digits.keras")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Keras model of the digits normal CNN (default %(default)s)")
    p.add_argument("--n", type=int, default=10, help="images attacked (default %(default)s)")
    p.add_argument("--iterations", type=int, default=100,
                   help="CW iterations per binary search step (default %(default)s)")
    p.add_argument("--binary_steps", type=int, default=9,
                   help="binary search steps over c (default %(default)s)")
    p.add_argument("--initial_const", type=float, default=1e-3)
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--train_epochs", type=int, default=0,
                   help="without a model file: train the random CNN this many epochs (default 0)")
    p.add_argument("--seed", type=int, default=1215)
    p.add_argument("--rounds", type=int, default=2,
                   help="warm timed rounds per side, interleaved; the minimum is reported "
                        "(default %(default)s)")
    p.add_argument("--no_art", action="store_true", help="time only attacks.py")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    for name in ("n", "iterations", "binary_steps", "rounds"):
        check_positive("--" + name, getattr(args, name))
    check_positive("--train_epochs", args.train_epochs, allow_zero=True)
    return args


def digits_cnn():
    """The original tool's MNIST "normal" CNN for 28 x 28 x 1 inputs, logits out."""
    import keras
    from keras import layers

    inputs = keras.Input((28, 28, 1))
    x = inputs
    for i, channels in enumerate((32, 32, 64, 64)):
        x = layers.Conv2D(channels, 3, activation="relu")(x)
        if i % 2 == 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(200, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(200, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def digits_data():
    """(train images, train labels, test images, test labels), images in [-0.5, 0.5].

    The team's digits loader when it imports; otherwise scikit-learn's 8 x 8
    digits resampled here into a 20 x 20 box centred in 28 x 28, like MNIST.
    """
    try:
        from setup_mnist import Digits

        data = Digits()
        return (data.train_data, data.train_labels.argmax(1), data.test_data,
                data.test_labels.argmax(1), "setup_mnist.Digits test split")
    except Exception as err:  # the loader is optional for this benchmark
        log.info("setup_mnist.Digits unavailable (%s); resampling sklearn digits", err)
    from scipy import ndimage
    from sklearn.datasets import load_digits

    bunch = load_digits()
    big = ndimage.zoom(bunch.images / 16.0, (1, 2.5, 2.5), order=1, grid_mode=True, mode="nearest")
    images = np.zeros((len(big), 28, 28), np.float32)
    images[:, 4:24, 4:24] = np.clip(big, 0.0, 1.0)
    images = (images - 0.5)[..., None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(1215)
    order = rng.permutation(len(images))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test], "sklearn digits resampled here"


def load_or_build(args, train_x, train_y):
    import keras

    try:
        import models  # noqa: F401  registers the toolkit's custom activations for loading
    except Exception as err:  # optional here: the normal CNN needs none of them
        log.info("models.py not importable (%s)", err)
    if os.path.exists(args.model):
        return keras.saving.load_model(args.model, compile=False), f"{args.model} (trained)"
    keras.utils.set_random_seed(args.seed)
    model = digits_cnn()
    if not args.train_epochs:
        return model, f"{args.model} not found: the same architecture with RANDOM weights"
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train_x, train_y, epochs=args.train_epochs, batch_size=64, verbose=0)
    return model, (f"{args.model} not found: the same architecture trained here for "
                   f"{args.train_epochs} epoch(s)")


def build_ours(model, args, abort_early: bool):
    """A callable attacking (x, labels) with attacks.CarliniWagnerL2 (returns an AttackResult)."""
    import attacks

    attack = attacks.CarliniWagnerL2(model, max_iterations=args.iterations,
                                     binary_search_steps=args.binary_steps,
                                     initial_const=args.initial_const,
                                     learning_rate=args.learning_rate, abort_early=abort_early,
                                     batch_size=args.n)

    def run(x, labels):
        return attack(x, labels=labels)

    return run


def art_available() -> str | None:
    """ART's version, or None when it is not installed."""
    try:
        import art

        return art.__version__
    except ImportError:
        return None


def build_art(model, args, input_shape):
    """A callable attacking (x, labels) with ART's CarliniL2Method; returns adversarials."""
    import keras
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model, nb_classes=10, input_shape=input_shape,
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(-0.5, 0.5))
    attack = CarliniL2Method(classifier, confidence=0.0, targeted=False,
                             learning_rate=args.learning_rate,
                             binary_search_steps=args.binary_steps, max_iter=args.iterations,
                             initial_const=args.initial_const, batch_size=args.n, verbose=False)

    def run(x, labels):
        return np.asarray(attack.generate(x=x, y=np.eye(10, dtype=np.float32)[labels]),
                          np.float32)

    return run


def timed(fn, *a):
    """(result, wall seconds) of one call: the same timer for every side."""
    start = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - start


def main(args) -> int:
    setup_logging(args.verbose)
    import keras
    import tensorflow as tf

    import attacks

    train_x, train_y, test_x, test_y, source = digits_data()
    model, model_note = load_or_build(args, train_x, train_y)
    pred = attacks.predict_logits(model, test_x).argmax(1)
    correct = np.flatnonzero(pred == test_y)
    if len(correct) < args.n:
        # A random-weight model classifies few images correctly; attack its
        # predictions instead, which is what the timing needs.
        log.warning("only %d correctly classified images; attacking predicted labels", len(correct))
        pick, labels = np.arange(args.n), pred[:args.n]
    else:
        pick = correct[:args.n]
        labels = test_y[pick]
    x = test_x[pick].astype(np.float32)

    print(f"# CW L2 benchmark: {args.n} images, {args.iterations} iterations x "
          f"{args.binary_steps} binary steps, initial c {args.initial_const:g}, "
          f"lr {args.learning_rate:g}, untargeted")
    print(f"# model: {model_note}")
    print(f"# data: {source}; test accuracy {np.mean(pred == test_y):.3f}")
    print(f"# command: {' '.join([os.path.basename(sys.argv[0])] + list(sys.argv[1:]))}")
    print(f"# versions: tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"numpy {np.__version__}, cpu threads {os.cpu_count()}")

    print(f"# timing: wall clock around one call on all {len(x)} images per side; cold = first "
          f"call, warm = minimum of {args.rounds} interleaved rounds")
    n = len(x)
    version = None if args.no_art else art_available()
    if version is None and not args.no_art:
        print("ART: not installed; install it with "
              "`.venv/bin/pip install adversarial-robustness-toolbox==1.20.1` to compare")
    sides = {"ours": build_ours(model, args, True),
             "ours, no early abort": build_ours(model, args, False)}
    if version is not None:
        sides[f"ART {version} CarliniL2Method"] = build_art(model, args, x.shape[1:])
    cold, warm, results = {}, {name: [] for name in sides}, {}
    for name, fn in sides.items():  # cold: the first call of each attack object
        results[name], cold[name] = timed(fn, x, labels)
    for _ in range(args.rounds):  # interleaved so that machine load hits every side alike
        for name, fn in sides.items():
            results[name], seconds = timed(fn, x, labels)
            warm[name].append(seconds)
    best = {name: min(v) for name, v in warm.items()}
    for name in sides:
        if name.startswith("ART"):
            adv = results[name]
            success = np.asarray(model(adv, training=False)).argmax(1) != labels
            l2 = np.linalg.norm((adv - x).reshape(n, -1), axis=1)
            mean_l2 = float(np.mean(l2[success])) if success.any() else float("nan")
            rate = success.mean()
        else:
            res = results[name]
            rate, mean_l2 = res.success.mean(), res.mean_distortion(Norm.L2)
        print(f"{name}: warm {best[name]:.2f} s ({best[name] / n:.3f} s/image; rounds "
              + ", ".join(f"{v:.2f}" for v in warm[name]) + f"), cold {cold[name]:.2f} s; "
              f"success {rate:.0%}, mean L2 {mean_l2:.4f}")
    if version is None:
        return 0
    art_name = f"ART {version} CarliniL2Method"
    full, abort = "ours, no early abort", "ours"
    print(f"ratio ART / ours, like for like (no early abort, both warm): "
          f"{best[art_name] / best[full]:.2f}x")
    print(f"ratio ART / ours, like for like (no early abort, both cold): "
          f"{cold[art_name] / cold[full]:.2f}x")
    print(f"ratio ART / ours, ours with early abort (both warm): "
          f"{best[art_name] / best[abort]:.2f}x")
    print(f"ratio ART / ours, ours with early abort (both cold): "
          f"{cold[art_name] / cold[abort]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
