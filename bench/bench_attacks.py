"""Carlini-Wagner L2 time per image: attacks.py against ART's CarliniL2Method.

Both attacks run untargeted on the same N correctly classified digits test
images (28 x 28 x 1, the MNIST layout) with the same iterations, binary search
steps, initial constant and learning rate, on the digits "normal" 7-layer CNN
(``models/digits.keras`` when it exists; otherwise the same architecture with
random weights, or briefly trained with ``--train_epochs``, which the output
says). One timed run each; ours is also timed a second time, warm (its
tf.functions already traced), because tracing is a one-off per attack object,
and once more without early abort, since ART's CarliniL2Method has none.

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
    p.add_argument("--no_art", action="store_true", help="time only attacks.py")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    for name in ("n", "iterations", "binary_steps"):
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


def time_ours(model, x, labels, args, abort_early: bool = True):
    """(result of the warm run, cold seconds, warm seconds) of attacks.CarliniWagnerL2."""
    import attacks

    attack = attacks.CarliniWagnerL2(model, max_iterations=args.iterations,
                                     binary_search_steps=args.binary_steps,
                                     initial_const=args.initial_const,
                                     learning_rate=args.learning_rate, abort_early=abort_early,
                                     batch_size=len(x))
    start = time.perf_counter()
    cold = attack(x, labels=labels)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = attack(x, labels=labels)
    warm_s = time.perf_counter() - start
    if not np.array_equal(cold.success, warm.success):
        log.warning("the cold and warm runs differ in success")
    return warm, cold_s, warm_s


def art_available() -> str | None:
    """ART's version, or None when it is not installed."""
    try:
        import art

        return art.__version__
    except ImportError:
        return None


def time_art(model, x, labels, args):
    import keras
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model, nb_classes=10, input_shape=x.shape[1:],
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(-0.5, 0.5))
    attack = CarliniL2Method(classifier, confidence=0.0, targeted=False,
                             learning_rate=args.learning_rate,
                             binary_search_steps=args.binary_steps, max_iter=args.iterations,
                             initial_const=args.initial_const, batch_size=len(x), verbose=False)
    start = time.perf_counter()
    adv = attack.generate(x=x, y=np.eye(10, dtype=np.float32)[labels])
    seconds = time.perf_counter() - start
    adv = np.asarray(adv, np.float32)
    pred = np.asarray(model(adv, training=False)).argmax(1)
    success = pred != labels
    l2 = np.linalg.norm((adv - x).reshape(len(x), -1), axis=1)
    return success, l2, seconds


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

    n = len(x)
    ours, cold_s, warm_s = time_ours(model, x, labels, args)
    print(f"ours: {warm_s:.2f} s warm ({warm_s / n:.3f} s/image), {cold_s:.2f} s cold incl. "
          f"tracing; success {ours.success.mean():.0%}, mean L2 "
          f"{ours.mean_distortion(Norm.L2):.4f}")
    # ART has no early abort: also time ours running every iteration.
    full, full_cold_s, full_s = time_ours(model, x, labels, args, abort_early=False)
    print(f"ours, no early abort: {full_s:.2f} s warm ({full_s / n:.3f} s/image), "
          f"{full_cold_s:.2f} s cold; success {full.success.mean():.0%}, mean L2 "
          f"{full.mean_distortion(Norm.L2):.4f}")

    version = None if args.no_art else art_available()
    if version is None:
        if not args.no_art:
            print("ART: not installed; install it with "
                  "`.venv/bin/pip install adversarial-robustness-toolbox==1.20.1` to compare")
        return 0
    success, l2, art_s = time_art(model, x, labels, args)
    mean_l2 = float(np.mean(l2[success])) if success.any() else float("nan")
    print(f"ART {version} CarliniL2Method: {art_s:.2f} s ({art_s / n:.3f} s/image); "
          f"success {success.mean():.0%}, mean L2 {mean_l2:.4f}")
    print(f"ratio ART / ours: {art_s / warm_s:.1f}x warm, {art_s / cold_s:.1f}x cold; "
          f"without early abort {art_s / full_s:.1f}x warm, {art_s / full_cold_s:.1f}x cold")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
