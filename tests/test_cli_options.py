"""Command-line options of both stages, each run once on tiny inputs.

Stage 1 runs through ``parse_args(argv)`` + ``main`` (the CLI path without a
new interpreter) or as a real process where a signal is involved. Expected
values are known answers: on a linear model every gradient norm is
||w_c - w_j||_q, and the caps are R / d^e with e worked out by hand.
"""
import glob
import gzip
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

import clever
import collect_gradients
from common import Norm, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-n", "2", "-N", "8", "-i", "4", "-q", "--no_progress"]
ORD = {"G1_max": 1, "G2_max": 2, "Gi_max": np.inf}
# Keys that legitimately differ between two runs writing the same numbers.
VOLATILE = ("provenance", "path", "args")


def _mats(folder):
    return sorted(glob.glob(os.path.join(str(folder), "**", "*.mat"), recursive=True))


def _load(path):
    return scipy.io.loadmat(path)


def _stage1(argv):
    status = run_cli(collect_gradients.main, collect_gradients.parse_args, argv,
                     prog="collect_gradients.py")
    assert status == 0
    return status


def _assert_exact_linear_norms(files, w):
    assert files
    for path in files:
        d = _load(path)
        c, j = d["true_label"].item(), d["target_label"].item()
        diff = w[:, c].astype(np.float64) - w[:, j]
        for key, q in ORD.items():
            np.testing.assert_allclose(d[key].ravel(), np.linalg.norm(diff, q), rtol=2e-6,
                                       err_msg=f"{os.path.basename(path)} {key}")


# --------------------------------------------------------------------------
# --sample_norm, --radius, --uniform_ball
# --------------------------------------------------------------------------
# Caps on 784-dimensional digits, by hand: sqrt(784) = 28.
@pytest.mark.parametrize("norm,radius_flag,radius,caps", [
    ("li", [], 0.1, {Norm.L1: 0.1, Norm.L2: 0.1, Norm.LINF: 0.1}),
    ("l1", [], 30.0, {Norm.L1: 30.0, Norm.L2: 30.0 / 28, Norm.LINF: 30.0 / 784}),
    ("l2", ["--radius", "0.7"], 0.7, {Norm.L1: 0.7, Norm.L2: 0.7, Norm.LINF: 0.025}),
    ("l1", ["--radius", "5.6"], 5.6, {Norm.L1: 5.6, Norm.L2: 0.2, Norm.LINF: 5.6 / 784}),
])
def test_sample_norm_and_radius_are_recorded_and_cap_stage2(tmp_path, linear_model_path,
                                                            linear_weights, norm, radius_flag,
                                                            radius, caps):
    w, _ = linear_weights
    _stage1(["--model_path", linear_model_path, "--sample_norm", norm, *radius_flag,
             "-s", str(tmp_path)] + TINY)
    files = _mats(tmp_path)
    _assert_exact_linear_norms(files, w)
    for path in files:
        d = _load(path)
        assert d["sample_norm"].item() == norm
        assert d["radius"].item() == radius
        assert d["uniform_ball"].item() == 0
    result = clever.score_folder(str(tmp_path / "digits_linear"), clever.Options(nthreads=1))
    assert result.files and not result.errors
    for fs in result.files:
        for p, cap in caps.items():
            assert fs.scores[p].cap == pytest.approx(cap, rel=1e-12)
            assert fs.scores[p].bound == pytest.approx(min(cap, fs.scores[p].bound_uncapped),
                                                       rel=1e-12)


def test_uniform_ball_is_recorded_and_draws_other_points(tmp_path, tanh_model_path):
    base = ["--model_path", tanh_model_path, "--targets", "top2"] + TINY
    _stage1(base + ["-s", str(tmp_path / "orig")])
    _stage1(base + ["--uniform_ball", "-s", str(tmp_path / "unif")])
    orig, unif = _mats(tmp_path / "orig"), _mats(tmp_path / "unif")
    assert [os.path.basename(p) for p in orig] == [os.path.basename(p) for p in unif] and orig
    for po, pu in zip(orig, unif):
        do, du = _load(po), _load(pu)
        assert do["uniform_ball"].item() == 0 and du["uniform_ball"].item() == 1
        assert du["radius"].item() == 3.0
        # tanh: gradient norms depend on where the points fall.
        assert not np.array_equal(do["G2_max"], du["G2_max"])


# --------------------------------------------------------------------------
# --force_order2
# --------------------------------------------------------------------------
def test_force_order2_runs_a_relu_model(tmp_path, capsys, linear_weights):
    import keras

    # relu(x W + b + 100) then the identity: the linear digits classifier's
    # predictions (mostly correct) through a ReLU layer.
    w, b = linear_weights
    inp = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(10, activation="relu")
    out = keras.layers.Dense(10)
    model = keras.Model(inp, out(hidden(keras.layers.Flatten()(inp))))
    hidden.set_weights([w, b + 100.0])
    out.set_weights([np.eye(10, dtype=np.float32), np.zeros(10, np.float32)])
    path = str(tmp_path / "relu10.keras")
    model.save(path)
    argv = ["--model_path", path, "--order", "2", "--power_iters", "3", "--targets", "top2",
            "-s", str(tmp_path / "out")] + TINY
    status = run_cli(collect_gradients.main, collect_gradients.parse_args, argv,
                     prog="collect_gradients.py")
    assert status == 2 and "--force_order2" in capsys.readouterr().err
    assert not _mats(tmp_path / "out")
    _stage1(argv + ["--force_order2"])
    files = _mats(tmp_path / "out")
    assert files and all(p.endswith("_order2.mat") for p in files)
    for p in files:
        d = _load(p)
        assert d["H2_max"].size == 4 and d["order"].item() == 2


# --------------------------------------------------------------------------
# -d mnist and -d cifar on files written here
# --------------------------------------------------------------------------
def _dense_model(path, shape, seed):
    import keras

    rng = np.random.default_rng(seed)
    inp = keras.Input(shape)
    dense = keras.layers.Dense(10)
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    w = rng.normal(0, 0.05, (int(np.prod(shape)), 10)).astype(np.float32)
    b = rng.normal(0, 0.1, 10).astype(np.float32)
    dense.set_weights([w, b])
    model.save(path)
    return w, b


def _idx(images=None, labels=None):
    if images is not None:
        n, rows, cols = images.shape
        return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    return struct.pack(">II", 2049, len(labels)) + np.asarray(labels, np.uint8).tobytes()


def _check_dataset_run(folder, w, b, test_pixels, nimg):
    files = _mats(folder)
    assert len(files) == 3 * nimg, files
    for path in files:
        d = _load(path)
        i, c, j = d["id"].item(), d["true_label"].item(), d["target_label"].item()
        # The loader scales pixels to [-0.5, 0.5]: p / 255 - 0.5.
        x = test_pixels[i].reshape(-1).astype(np.float64) / 255 - 0.5
        logits = x @ w + b
        assert np.argmax(logits) == c
        np.testing.assert_allclose(d["g_x0"].item(), logits[c] - logits[j], rtol=1e-4, atol=1e-6)
        diff = w[:, c].astype(np.float64) - w[:, j]
        for key, q in ORD.items():
            np.testing.assert_allclose(d[key].ravel(), np.linalg.norm(diff, q), rtol=2e-6)
        assert d["dim"].item() == w.shape[0]


def test_mnist_through_stage1(tmp_path):
    w, b = _dense_model(str(tmp_path / "mnistlin.keras"), (28, 28, 1), 1)
    rng = np.random.default_rng(2)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    # Labels are the model's own predictions, so no image is skipped.
    labels = np.argmax((test.reshape(3, -1) / 255 - 0.5) @ w + b, axis=1)
    data = tmp_path / "data"
    data.mkdir()
    files = {"train-images-idx3-ubyte.gz": _idx(images=np.zeros((5001, 28, 28), np.uint8)),
             "train-labels-idx1-ubyte.gz": _idx(labels=np.zeros(5001, np.uint8)),
             "t10k-images-idx3-ubyte.gz": _idx(images=test),
             "t10k-labels-idx1-ubyte.gz": _idx(labels=labels)}
    for name, raw in files.items():
        (data / name).write_bytes(gzip.compress(raw))
    _stage1(["-d", "mnist", "--data_dir", str(data), "--model_path",
             str(tmp_path / "mnistlin.keras"), "-s", str(tmp_path / "out")] + TINY)
    assert os.path.isdir(tmp_path / "out" / "mnist_mnistlin")
    _check_dataset_run(tmp_path / "out", w, b, test, 2)


def test_cifar_through_stage1(tmp_path):
    w, b = _dense_model(str(tmp_path / "cifarlin.keras"), (32, 32, 3), 3)
    rng = np.random.default_rng(4)
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = np.argmax((test.reshape(3, -1) / 255 - 0.5) @ w + b, axis=1)
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def records(images, labs):
        # One label byte, then the red, green and blue planes of 32x32.
        planes = np.transpose(images, (0, 3, 1, 2)).reshape(len(images), -1)
        return np.concatenate([np.asarray(labs, np.uint8)[:, None], planes], axis=1).tobytes()

    zeros = np.zeros((1001, 32, 32, 3), np.uint8)
    for k in range(1, 6):
        (folder / f"data_batch_{k}.bin").write_bytes(records(zeros, np.zeros(1001)))
    (folder / "test_batch.bin").write_bytes(records(test, labels))
    _stage1(["-d", "cifar", "--data_dir", str(tmp_path / "data"), "--model_path",
             str(tmp_path / "cifarlin.keras"), "-s", str(tmp_path / "out")] + TINY)
    assert os.path.isdir(tmp_path / "out" / "cifar_cifarlin")
    _check_dataset_run(tmp_path / "out", w, b, test, 2)


# --------------------------------------------------------------------------
# SIGTERM, resume, and a resumed run equal to a fresh one
# --------------------------------------------------------------------------
def _start(argv, cwd, hold=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    # hold: tests/hold.py stops the run inside, after its first file, until the signal.
    driver = [os.path.join(ROOT, "tests", "hold.py")] if hold else []
    return subprocess.Popen([sys.executable] + driver
                            + [os.path.join(ROOT, "collect_gradients.py")] + argv,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _same_values(a, b):
    da, db = _load(a), _load(b)
    keys = sorted(k for k in da if not k.startswith("__") and k not in VOLATILE)
    assert keys == sorted(k for k in db if not k.startswith("__") and k not in VOLATILE)
    for key in keys:
        np.testing.assert_array_equal(da[key], db[key], err_msg=f"{os.path.basename(a)} {key}")


def test_sigterm_then_rerun_completes_with_the_values_of_a_fresh_run(tmp_path, tanh_model_path):
    # 6 images x 3 targets; the run is held inside once the first file is on
    # disk (tests/hold.py), so the signal lands mid-run on any machine.
    argv = ["--model_path", tanh_model_path, "-n", "6", "-N", "64", "-i", "60", "--sampler",
            "tf", "-q", "--no_progress", "--compute_slope"]
    out = tmp_path / "resumed"
    proc = _start(argv + ["-s", str(out)], tmp_path, hold=True)
    for line in proc.stderr:
        if line.startswith("[HOLD]"):
            break
    assert line.startswith("[HOLD]"), proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), "the run ended before the signal"
    assert "Traceback" not in err
    first = _mats(out)
    assert len(first) == 1
    for path in first:
        assert _load(path)["G2_max"].size == 60
    assert not [f for f in os.listdir(os.path.dirname(first[0])) if f.endswith(".part")]
    stamps = {p: os.stat(p).st_mtime_ns for p in first}

    rerun = _start(argv + ["-s", str(out)], tmp_path)
    rest, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    resumed = _mats(out)
    assert rest.count("[STATS][L1] total") == len(resumed) - len(first)
    assert all(os.stat(p).st_mtime_ns == s for p, s in stamps.items())  # kept, not redone

    fresh_dir = tmp_path / "fresh"
    _stage1(argv + ["-s", str(fresh_dir)])
    fresh = _mats(fresh_dir)
    assert len(fresh) == len(resumed) == 18
    assert [os.path.basename(p) for p in fresh] == [os.path.basename(p) for p in resumed]
    for a, b in zip(resumed, fresh):
        _same_values(a, b)


# --------------------------------------------------------------------------
# clever.py --shape_reg and --method on maxima with real spread
# --------------------------------------------------------------------------
DEBUG = re.compile(r"\[DEBUG\]\[L1\] id = (\d+), true_label = (\d+), target_label = (\d+), "
                   r"info = (\w+), .*bnd_norm = (\w+), bnd = (\S+), ks = (\S+), pVal = (\S+), "
                   r"shape = (\S+), loc = (\S+), scale = (\S+), g_x0 = (\S+)$")


@pytest.fixture(scope="module")
def spread_folder(tmp_path_factory):
    """Stage-1 files whose maxima follow a reverse Weibull (loc 2, scale 0.5, shape 4)."""
    folder = tmp_path_factory.mktemp("spread")
    rng = np.random.default_rng(11)
    for img in range(3):
        for target, info in ((1, "top2"), (2, "least")):
            maxima = {}
            for key, scale in (("G1_max", 20.0), ("G2_max", 2.0), ("Gi_max", 0.2)):
                maxima[key] = scale * (1.0 - 0.25 * rng.weibull(4.0, 50))
            mat = dict(maxima, L1_max=np.zeros(50), L2_max=np.zeros(50), Li_max=np.zeros(50),
                       g_x0=1.5, pred=np.arange(10.0)[None], id=img, true_label=0,
                       target_label=target, info=info, args="{}", path="")
            scipy.io.savemat(str(folder / f"1024_50_{img}_0_{target}_{info}_relu_order1.mat"), mat)
    return str(folder)


def _fits(folder, extra, capsys):
    capsys.readouterr()
    assert clever.main(clever.parse_args([folder, "--nthreads", "1", "--no_radius_cap"]
                                         + extra)) == 0
    out = capsys.readouterr().out.splitlines()
    fits = {}
    for line in out:
        m = DEBUG.match(line)
        if m:
            fits[(m.group(1), m.group(3), m.group(5))] = tuple(float(m.group(k))
                                                              for k in (6, 9, 10, 11))
    assert len(fits) == 18, out[:5]
    return fits


@pytest.mark.parametrize("extra", [["--shape_reg", "0.5"], ["--method", "mle"]])
def test_fit_options_change_the_fitted_numbers(spread_folder, capsys, extra):
    default = _fits(spread_folder, [], capsys)
    other = _fits(spread_folder, extra, capsys)
    assert default.keys() == other.keys()
    changed = 0
    for key, (bnd, shape, loc, scale) in default.items():
        obnd, oshape, oloc, oscale = other[key]
        assert np.isfinite([bnd, obnd]).all() and bnd > 0 and obnd > 0
        if abs(oloc - loc) > 1e-4 * abs(loc) or abs(oshape - shape) > 1e-4 * abs(shape):
            changed += 1
    # The penalty changes at least half of the 18 fits (printed to 5 digits).
    assert changed >= 9, (changed, extra)


def test_shape_reg_zero_is_plain_mle(spread_folder, capsys):
    assert _fits(spread_folder, ["--shape_reg", "0"], capsys) == \
        _fits(spread_folder, ["--method", "mle"], capsys)
