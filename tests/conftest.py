"""Test configuration: the repository root is importable, TensorFlow is quiet."""
import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run on the CPU whatever the machine has, so numbers are reproducible.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


def _fit_linear_digits():
    """Weights [784, 10] and biases of a logistic regression on the digits set."""
    from sklearn.linear_model import LogisticRegression

    import models

    data = models.load_dataset("digits")
    x = data.train_data.reshape(len(data.train_data), -1)
    clf = LogisticRegression(max_iter=300, C=0.1).fit(x, data.train_labels.argmax(1))
    return clf.coef_.T.astype("float32"), clf.intercept_.astype("float32")


@pytest.fixture(scope="session")
def linear_weights():
    return _fit_linear_digits()


def _save_dense_model(path, weights, bias, activation=None):
    import keras

    inp = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10, activation=activation)
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([weights, bias])
    model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def linear_model_path(tmp_path_factory, linear_weights):
    """A linear classifier of the digits (a Keras .keras file): g has constant gradient."""
    return _save_dense_model(tmp_path_factory.mktemp("models") / "linear.keras", *linear_weights)


@pytest.fixture(scope="session")
def tanh_model_path(tmp_path_factory, linear_weights):
    """tanh of the linear logits: same predictions, gradients that vary with x."""
    return _save_dense_model(tmp_path_factory.mktemp("models") / "lintanh.keras",
                             *linear_weights, activation="tanh")


TRAIN_LINE = re.compile(r"\[TRAIN\] dataset = digits, model = (\S+), test_accuracy = (\d\.\d{4}), "
                        r"time = (\d+\.\d)s")


@contextlib.contextmanager
def _run_wide(tmp_path_factory, name):
    """A folder shared by every pytest-xdist worker of this run, held under a lock.

    Without xdist it is this session's own. Yields the folder while holding the lock.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder; each worker's basetemp is inside it
    folder = base / name
    folder.mkdir(exist_ok=True)
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker trains, the others wait for it
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """The four digits demo models, trained once per test run with default settings.

    Returns a namespace: dir (a --models_dir), stdout, results (name ->
    (test accuracy, seconds)), wall (seconds).
    """
    with _run_wide(tmp_path_factory, "digits_models") as models_dir:
        record = models_dir.parent / "digits_models.json"  # beside: the folder holds models only
        if not record.exists():
            start = time.time()
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_models.py"),
                                   "--dataset", "digits", "--models",
                                   "normal,distilled,2-layer,brelu", "--models_dir",
                                   str(models_dir)], capture_output=True, text=True, cwd=ROOT,
                                  timeout=1800, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            record.write_text(json.dumps({"stdout": proc.stdout, "wall": time.time() - start}))
        done = json.loads(record.read_text())
    results = {m.group(1): (float(m.group(2)), float(m.group(3)))
               for m in TRAIN_LINE.finditer(done["stdout"])}
    return argparse.Namespace(dir=str(models_dir), stdout=done["stdout"], results=results,
                              wall=done["wall"])


@pytest.fixture(scope="session")
def digits_tanh_dir(tmp_path_factory, trained_digits):
    """Adds the 7-layer tanh CNN (digits_cnn_7layer_tanh) to the trained models' folder."""
    with _run_wide(tmp_path_factory, "digits_models") as models_dir:
        marker = models_dir.parent / "digits_models.tanh"
        if not marker.exists():
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_nlayer.py"),
                                   "--model", "digits", "--modeltype", "cnn", "--activation",
                                   "tanh", "32", "32", "64", "64", "200", "200", "--models_dir",
                                   trained_digits.dir], capture_output=True, text=True, cwd=ROOT,
                                  timeout=1800, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            marker.write_text("")
    return trained_digits.dir


def quadratic_model(eigenvalues, seed=0):
    """A model callable with logits [g(x), 0, 0], g(x) = 0.5 x'Ax + 10, A = Q diag(eigenvalues) Q'.

    Its Hessian has the given eigenvalues everywhere: a known answer for second order.
    """
    import numpy as np
    import tensorflow as tf

    d = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    a = tf.constant(q @ np.diag(eigenvalues) @ q.T, tf.float32)

    def model(x, training=False):
        flat = tf.reshape(x, [-1, d])
        g = 0.5 * tf.reduce_sum(flat * (flat @ a), axis=1) + 10.0
        return tf.stack([g, tf.zeros_like(g), tf.zeros_like(g)], axis=1)

    return model


def model_in_range(inner_path, lo, hi, path):
    """Save at ``path`` the model taking inputs in [lo, hi]: x -> (x - lo) / (hi - lo) - 0.5, then
    the [-0.5, 0.5] model of ``inner_path`` (a Keras Rescaling layer in front of it)."""
    import keras

    inner = keras.saving.load_model(str(inner_path), compile=False)
    inp = keras.Input(inner.input_shape[1:])
    scaled = keras.layers.Rescaling(1.0 / (hi - lo), offset=-lo / (hi - lo) - 0.5)(inp)
    keras.Model(inp, inner(scaled)).save(str(path))
    return str(path)
