"""Stage 1: samplers, the gradient-norm estimator and collect_gradients.py."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import quadratic_model
import scipy.io
import scipy.stats

import collect_gradients
from common import DEFAULT_RADIUS, run_cli
from randsphere import BallSampler, SamplerPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_ORD = {"l2": 2, "li": np.inf, "l1": 1}


def _norms(x, norm):
    return np.linalg.norm(np.asarray(x, np.float64).reshape(len(x), -1), ord=NORM_ORD[norm], axis=1)


def _tf_draw(sampler, n, dim, seed=(3, 4)):
    import tensorflow as tf

    from estimate_gradient_norm import tf_draw

    return tf_draw(sampler, tf.constant(seed, tf.int64), n, dim).numpy()


def _draw(kind, sampler, n, dim):
    if kind == "numpy":
        return sampler.draw(np.random.default_rng(7), n, dim)
    return _tf_draw(sampler, n, dim)


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "tf"])
@pytest.mark.parametrize("norm", ["l2", "li", "l1"])
@pytest.mark.parametrize("uniform", [False, True])
def test_samples_stay_in_their_ball(kind, norm, uniform):
    sampler = BallSampler.create(norm, None, uniform)
    x = _draw(kind, sampler, 2000, 784)
    assert x.shape == (2000, 784) and x.dtype == np.float32
    r = _norms(x, norm)
    assert r.max() <= DEFAULT_RADIUS[norm] * (1 + 1e-5)
    assert r.min() >= 0 and np.all(np.isfinite(x))
    # Samples spread over the ball rather than sitting at its centre.
    assert np.median(r) > 0.2 * DEFAULT_RADIUS[norm]


def test_points_are_clipped_to_the_data_range():
    sampler = BallSampler.create("l2", 3.0)
    x0 = np.full((28, 28, 1), 0.49, np.float32)
    x0[:14] = -0.49
    pts = sampler.points(np.random.default_rng(0), x0, 500)
    assert pts.shape == (500, 28, 28, 1)
    assert pts.min() >= -0.5 and pts.max() <= 0.5
    # Clipping towards x0's box only moves points closer to x0: still in the ball.
    assert _norms(pts - x0[None], "l2").max() <= 3.0 * (1 + 1e-5)


@pytest.mark.parametrize("kind", ["numpy", "tf"])
@pytest.mark.parametrize("norm", ["l2", "li", "l1"])
def test_uniform_ball_radii_follow_r_u_to_the_1_over_d(kind, norm):
    dim, radius = 50, 0.7
    x = _draw(kind, BallSampler.create(norm, radius, True), 2000, dim)
    # Uniform in a ball of any norm: P(||x|| <= r) = (r / R)^d.
    p = scipy.stats.kstest(_norms(x, norm), lambda r: np.clip(r / radius, 0, 1) ** dim).pvalue
    assert p > 0.01


@pytest.mark.parametrize("kind", ["numpy", "tf"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_original_scheme_is_not_uniform_in_the_ball(kind, norm):
    dim, radius = 50, 0.7
    x = _draw(kind, BallSampler.create(norm, radius, False), 2000, dim)
    p = scipy.stats.kstest(_norms(x, norm), lambda r: np.clip(r / radius, 0, 1) ** dim).pvalue
    assert p < 0.01
    # ...but its scale is uniform in [0, R] as in the original tool.
    if norm == "l1":
        assert scipy.stats.kstest(_norms(x, norm) / radius, "uniform").pvalue > 0.01


def test_bad_sampler_arguments_are_clear_errors():
    from common import ToolError

    with pytest.raises(ToolError, match="--radius"):
        BallSampler.create("l2", -1.0)
    with pytest.raises(ToolError, match="sample_norm"):
        BallSampler.create("l3")


def _our_shm(pid):
    """/dev/shm entries a SamplerPool of process ``pid`` would create.

    The pool names its segment ``/clever-<pid>-<random>`` (randsphere.py) and
    unlinks it before any worker starts, so none should ever be listed. Only
    these names are compared: other processes on the machine may create and
    remove their own entries at any time.
    """
    if not os.path.isdir("/dev/shm"):
        return []
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"clever-{pid}-")]


def test_pool_matches_serial_sampling_and_leaves_no_segment():
    sampler = BallSampler.create("l1", 2.0, True)
    x0 = np.random.default_rng(1).uniform(-0.5, 0.5, (8, 8, 1)).astype(np.float32)
    jobs = [((5, 9, it, 0), 100) for it in range(7)]
    with SamplerPool(sampler, x0.shape, 100, nworkers=2) as pool:
        assert pool.name.startswith(f"/clever-{os.getpid()}-")  # the name _our_shm looks for
        assert _our_shm(os.getpid()) == []  # unlinked before any worker started
        got = [b.copy() for b in pool.stream(x0, jobs)]
        assert _our_shm(os.getpid()) == []
    from common import derived_seed

    for (parts, n), batch in zip(jobs, got):
        ref = sampler.points(np.random.default_rng(derived_seed(*parts)), x0, n)
        np.testing.assert_array_equal(batch, ref)
    assert _our_shm(os.getpid()) == []


# --------------------------------------------------------------------------
# collect_gradients.py in-process
# --------------------------------------------------------------------------
def _run(argv):
    args = collect_gradients.parse_args(argv)
    assert collect_gradients.main(args) == 0
    return args


def _mats(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.mat"), recursive=True))


def _load(path):
    return scipy.io.loadmat(path)


@pytest.mark.parametrize("sampler", ["tf", "shm"])
def test_linear_model_gradient_norms_are_exact(tmp_path, linear_model_path, linear_weights, sampler):
    w, _ = linear_weights
    _run(["--model_path", linear_model_path, "-N", "96", "-i", "4", "-n", "4", "-b", "64",
          "--sampler", sampler, "-s", str(tmp_path), "-q", "--no_progress"])
    files = _mats(tmp_path / "digits_linear")
    assert len(files) >= 9  # >= 3 correctly classified images x (least, top2, random)
    for path in files:
        d = _load(path)
        c, j = d["true_label"].item(), d["target_label"].item()
        diff = w[:, c].astype(np.float64) - w[:, j]
        for key, ord_ in (("G1_max", 1), ("G2_max", 2), ("Gi_max", np.inf)):
            np.testing.assert_allclose(d[key].ravel(), np.linalg.norm(diff, ord_), rtol=2e-6)
            assert d[key].size == 4
        pred = d["pred"].ravel()
        assert np.argmax(pred) == c
        np.testing.assert_allclose(d["g_x0"].item(), pred[c] - pred[j], rtol=1e-6)
        assert d["radius"].item() == 3.0 and d["sample_norm"].item() == "l2"
        assert d["sampler"].item() == sampler and d["seed"].item() == 1215
        assert d["Nsamps"].item() == 96 and d["Niters"].item() == 4 and d["dim"].item() == 784
        assert d["tf_version"].item() and d["tool_version"].item()
        assert d["nan_samples"].item() == 0 and d["zero_batches"].item() == 0
        prov = json.loads(d["provenance"].item())
        assert prov["args"]["Nsamps"] == 96 and "tensorflow" in prov["versions"]
        assert os.path.basename(path) == (f"96_4_{d['id'].item()}_{c}_{j}_{d['info'].item()}"
                                          "_relu_order1.mat")


@pytest.mark.parametrize("sampler", ["tf", "shm"])
def test_fixed_seed_gives_identical_results(tmp_path, tanh_model_path, sampler):
    common = ["--model_path", tanh_model_path, "-N", "64", "-i", "3", "-n", "2",
              "--sampler", sampler, "-q", "--no_progress", "--compute_slope"]
    _run(common + ["-s", str(tmp_path / "a")])
    _run(common + ["-s", str(tmp_path / "b")])
    _run(common + ["-s", str(tmp_path / "c"), "--seed", "7"])
    a, b, c = (_mats(tmp_path / k) for k in "abc")
    assert [os.path.basename(p) for p in a] == [os.path.basename(p) for p in b] and a
    differs = False
    for pa, pb, pc in zip(a, b, c):
        da, db, dc = _load(pa), _load(pb), _load(pc)
        for key in da:
            if key.startswith("__") or key in ("provenance", "path", "args"):
                continue
            np.testing.assert_array_equal(da[key], db[key], err_msg=key)
        pa_, pb_ = json.loads(da["provenance"].item()), json.loads(db["provenance"].item())
        assert pa_["args"] == {**pb_["args"], "save": pa_["args"]["save"]}
        differs |= not np.array_equal(da["G2_max"], dc["G2_max"])
        # A slope may exceed every sampled gradient norm (the mean value theorem puts the
        # maximum somewhere on the segment, not at a sample): only positivity is general.
        # The exact case is test_slope_on_a_linear_model_never_exceeds_its_gradient_norm.
        assert np.all(da["G2_max"] > 0) and np.all(da["L2_max"] > 0)
    assert differs, "another seed must draw other points"


def test_slope_on_a_linear_model_never_exceeds_its_gradient_norm(tmp_path, linear_model_path,
                                                               linear_weights):
    """The gradient is constant, so the mean value theorem is exact: every pair's slope
    is at most ||w_c - w_j||_q, the value of every G*_max (Hoelder's inequality)."""
    w, _ = linear_weights
    _run(["--model_path", linear_model_path, "-N", "64", "-i", "3", "-n", "2", "--targets",
          "top2", "--compute_slope", "-s", str(tmp_path), "-q", "--no_progress"])
    files = _mats(tmp_path)
    assert files
    for path in files:
        d = _load(path)
        c, j = d["true_label"].item(), d["target_label"].item()
        diff = w[:, c].astype(np.float64) - w[:, j]
        for q, ord_ in (("1", 1), ("2", 2), ("i", np.inf)):
            exact = np.linalg.norm(diff, ord_)
            np.testing.assert_allclose(d[f"G{q}_max"].ravel(), exact, rtol=2e-6)
            slope = d[f"L{q}_max"].ravel()
            assert np.all(slope > 0) and np.all(slope <= exact * (1 + 1e-5)), (q, slope, exact)


def test_untargeted_writes_one_file_per_other_class(tmp_path, linear_model_path):
    _run(["--model_path", linear_model_path, "-N", "32", "-i", "3", "-n", "2", "--targets", "all",
          "-s", str(tmp_path), "-q", "--no_progress"])
    files = _mats(tmp_path)
    infos = sorted(_load(p)["info"].item() for p in files)
    ids = {_load(p)["id"].item() for p in files}
    assert len(files) == 9 * len(ids)
    assert all(i.startswith("class") for i in infos)
    for p in files:
        d = _load(p)
        assert d["info"].item() == f"class{d['target_label'].item()}"


def test_target_type_mask_and_names_agree(tmp_path, linear_model_path):
    base = ["--model_path", linear_model_path, "-N", "16", "-i", "3", "-n", "2", "-q",
            "--no_progress"]
    _run(base + ["--target_type", "0b00101", "-s", str(tmp_path / "mask")])
    _run(base + ["--targets", "top2,least", "-s", str(tmp_path / "names")])
    names = lambda d: sorted(os.path.basename(p) for p in _mats(d))  # noqa: E731
    assert names(tmp_path / "mask") == names(tmp_path / "names")
    assert {_load(p)["info"].item() for p in _mats(tmp_path / "mask")} == {"top2", "least"}


def test_ids_csv_with_user_targets(tmp_path, linear_model_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("id,targets\n5,1,2\n3\n")
    _run(["--model_path", linear_model_path, "-N", "16", "-i", "3", "--ids", str(ids), "-n", "2",
          "--targets", "top2,user", "-s", str(tmp_path / "out"), "-q", "--no_progress"])
    got = {(d["id"].item(), d["target_label"].item(), d["info"].item())
           for d in map(_load, _mats(tmp_path / "out"))}
    user = {g for g in got if g[0] == 5}
    assert user <= {(5, 1, "user"), (5, 2, "user")} and user
    assert {g[2] for g in got if g[0] == 3} == {"top2"}


def test_rerun_resumes_and_overwrite_recomputes(tmp_path, linear_model_path, capsys):
    argv = ["--model_path", linear_model_path, "-N", "16", "-i", "3", "-n", "2", "-s",
            str(tmp_path), "-q", "--no_progress"]
    _run(argv)
    files = _mats(tmp_path)
    os.unlink(files[0])
    stamps = {p: os.stat(p).st_mtime_ns for p in files[1:]}
    capsys.readouterr()
    _run(argv)
    out = capsys.readouterr().out
    assert out.count("[STATS][L1] total") == 1  # only the missing file was recomputed
    assert all(os.stat(p).st_mtime_ns == s for p, s in stamps.items())
    _run(argv + ["--overwrite"])
    assert capsys.readouterr().out.count("[STATS][L1] total") == len(files)


def test_printed_lines_follow_the_original_formats(tmp_path, linear_model_path, capsys):
    _run(["--model_path", linear_model_path, "-N", "16", "-i", "2", "-n", "1", "-s",
          str(tmp_path), "--no_progress", "--targets", "top2"])
    out = capsys.readouterr().out.splitlines()
    num = r"[-+0-9.e]+|nan|inf"
    import re

    assert out[0].startswith("{") and "'Nsamps': 16" in out[0]  # the argument dict first
    out = out[1:]
    assert re.fullmatch(r"\[DATAGEN\]\[L1\] no = 1, true_id = 0, true_label = \d, predicted = \d, "
                        r"correct = True, seq = \[\d\], info = \['top2'\]", out[0])
    l2 = [x for x in out if x.startswith("[STATS][L2]")]
    assert len(l2) == 2
    for line in l2:
        assert re.fullmatch(rf"\[STATS\]\[L2\] loop = \d+, time = ({num}), iter_time = ({num}), "
                            rf"overhead = ({num}), G2 = ({num}), G1 = ({num}), Ginf = ({num}), "
                            r"target_class = \d", line)
    l1 = [x for x in out if x.startswith("[STATS][L1] total")]
    assert len(l1) == 1 and re.fullmatch(
        r"\[STATS\]\[L1\] total = 1, seq = 0, id = 0, time = [0-9.]+, true_class = \d, "
        r"target_class = \d, info = top2", l1[0])


def test_transform_uses_bpda_gradients(tmp_path, linear_model_path, linear_weights):
    """With BPDA the gradient at T(x) of a linear model is still w_c - w_j."""
    w, b = linear_weights
    _run(["--model_path", linear_model_path, "-N", "16", "-i", "3", "-n", "2", "--targets",
          "top2", "--transform", "defend_reduce", "-s", str(tmp_path), "-q", "--no_progress"])
    import defense
    import models

    data = models.load_dataset("digits")
    files = _mats(tmp_path)
    assert files
    for path in files:
        d = _load(path)
        c, j, i = d["true_label"].item(), d["target_label"].item(), d["id"].item()
        np.testing.assert_allclose(d["G2_max"].ravel(), np.linalg.norm(w[:, c] - w[:, j]),
                                   rtol=2e-6)
        # g(x0) is evaluated at the transformed image.
        tx = defense.apply_transform("defend_reduce", data.test_data[i:i + 1]).reshape(-1)
        logits = tx @ w + b
        np.testing.assert_allclose(d["g_x0"].item(), logits[c] - logits[j], rtol=1e-4)
        assert d["transform"].item() == "defend_reduce" and d["sampler"].item() == "shm"


# --------------------------------------------------------------------------
# NaN and zero gradients are counted, never hidden
# --------------------------------------------------------------------------
def test_zero_and_nan_gradients_are_counted():
    import tensorflow as tf

    from estimate_gradient_norm import GradientNormEstimator

    w = tf.constant(np.random.default_rng(0).normal(size=(16, 3)), tf.float32)

    def staircase(x, training=False):  # gradient masking: zero gradient almost everywhere
        return tf.round(tf.reshape(x, [-1, 16]) * 4.0) @ w

    def broken(x, training=False):
        flat = tf.reshape(x, [-1, 16])
        return tf.sqrt(flat - flat) @ w  # d sqrt(0) = inf, times 0 -> NaN

    sampler = BallSampler.create("li", 0.05)
    x0 = np.zeros((4, 4, 1), np.float32)
    est = GradientNormEstimator(staircase, (4, 4, 1), 32)
    stats = list(est.iterate(x0, 0, [1, 2], 32, 3, 1, 0, sampler))
    assert all(np.all(s.zero == 32) and np.all(s.nan == 0) for s in stats)
    assert all(np.all(s.grad_max == 0) for s in stats)
    est = GradientNormEstimator(broken, (4, 4, 1), 32)
    stats = list(est.iterate(x0, 0, [1], 32, 2, 1, 0, sampler))
    assert all(np.all(s.nan == 32) for s in stats)
    assert all(np.all(np.isnan(s.grad_max)) for s in stats)


def test_all_targets_share_the_samples(linear_weights):
    """One pass over T targets equals T single-target passes (same points per image)."""
    import tensorflow as tf

    from estimate_gradient_norm import GradientNormEstimator

    w = tf.constant(np.random.default_rng(2).normal(size=(16, 4)), tf.float32)
    model = lambda x, training=False: tf.tanh(tf.reshape(x, [-1, 16]) @ w)  # noqa: E731
    est = GradientNormEstimator(model, (4, 4, 1), 24, compute_slope=True)
    x0 = np.full((4, 4, 1), 0.1, np.float32)
    sampler = BallSampler.create("l2", 0.5)
    joint = list(est.iterate(x0, 0, [1, 2, 3], 50, 3, 11, 4, sampler))
    for k, j in enumerate([1, 2, 3]):
        single = list(est.iterate(x0, 0, [j], 50, 3, 11, 4, sampler))
        for a, b in zip(joint, single):
            np.testing.assert_allclose(a.grad_max[k], b.grad_max[0], rtol=1e-6)
            np.testing.assert_allclose(a.slope_max[k], b.slope_max[0], rtol=1e-6)


# --------------------------------------------------------------------------
# Errors, interruption, SIGKILL
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--order", "2", "--compute_slope"], "--compute_slope"),
    (["--transform", "defend_blur", "--sampler", "shm"], "defend_blur"),
    (["-N", "-3"], "--Nsamps"),
    (["--model_path", "/nonexistent/model.keras"], "--model_path"),
    (["--targets", "top3"], "--targets"),
    (["--transform", "defend_jpeg", "--sampler", "tf"], "--sampler shm"),
    (["--radius", "0"], "--radius"),
])
def test_bad_flags_give_one_line_errors(argv, needle, capsys):
    status = run_cli(collect_gradients.main, collect_gradients.parse_args, argv,
                     prog="collect_gradients.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("collect_gradients.py: error:") and needle in err[0]


def test_firstimg_beyond_the_test_set(tmp_path, linear_model_path, capsys):
    status = run_cli(collect_gradients.main, collect_gradients.parse_args,
                     ["--model_path", linear_model_path, "-f", "100000", "-s", str(tmp_path)])
    assert status == 2 and "--firstimg" in capsys.readouterr().err


def _start(argv, tmp_path, hold=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    # hold: tests/hold.py stops the run inside, after its first file, until the
    # signal, so the fault lands mid-run whatever the machine's speed.
    driver = [os.path.join(ROOT, "tests", "hold.py")] if hold else []
    # A suite started as a shell's background job (nohup ... &, some CI
    # runners) inherits SIGINT ignored, and Python keeps it ignored; a user's
    # Ctrl-C reaches a foreground process with the default disposition, which
    # is what the tests simulate.
    return subprocess.Popen([sys.executable] + driver
                            + [os.path.join(ROOT, "collect_gradients.py")] + argv,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_hold(proc):
    for line in proc.stderr:
        if line.startswith("[HOLD]"):
            return line
    raise AssertionError(f"the run ended without writing a file; stdout: {proc.stdout.read()[-2000:]}")


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_sigkill_leaves_no_segment_no_partial_file_and_rerun_completes(tmp_path, tanh_model_path):
    # 10 images x 3 targets: the run is held once the first file is on disk, and
    # the kill lands there.
    argv = ["--model_path", tanh_model_path, "-N", "256", "-i", "60", "-n", "10", "--sampler",
            "shm", "--nthreads", "2", "-s", str(tmp_path / "out"), "-q", "--no_progress"]
    proc = _start(argv, tmp_path, hold=True)
    _wait_for_hold(proc)
    workers = _children(proc.pid)
    assert workers, "the shm sampler runs worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers exit when the parent is killed"
    assert _our_shm(proc.pid) == []
    partial = len(_mats(tmp_path / "out"))
    assert partial == 1
    for path in _mats(tmp_path / "out"):
        assert _load(path)["G2_max"].size == 60  # every .mat present is complete
    rerun = _start(argv, tmp_path)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    files = _mats(tmp_path / "out")
    assert len(files) == 30 and out.count("[STATS][L1] total") == len(files) - partial
    assert not [f for f in os.listdir(files[0].rsplit("/", 1)[0]) if f.endswith(".part")]
    assert _our_shm(proc.pid) == [] and _our_shm(rerun.pid) == []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
        return fh.read().split()[2] != "Z"


def test_ctrl_c_stops_cleanly(tmp_path, tanh_model_path):
    # The run is held once its first file is written (sampling under way, the
    # workers started), and Ctrl-C lands there.
    proc = _start(["--model_path", tanh_model_path, "-N", "256", "-i", "200", "-n", "3",
                   "--sampler", "shm", "-s", str(tmp_path / "out"), "-q", "--no_progress"],
                  tmp_path, hold=True)
    _wait_for_hold(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _our_shm(proc.pid) == []
    assert "Traceback" not in err and "interrupted" in err
    out_dir = tmp_path / "out" / "digits_lintanh"
    assert not [f for f in os.listdir(out_dir) if f.endswith(".part")]
    for path in _mats(out_dir):
        assert _load(path)["G2_max"].size == 200


# --------------------------------------------------------------------------
# Second order
# --------------------------------------------------------------------------


@pytest.mark.parametrize("eigenvalues,expected", [
    ([-3.0, 1.0, 0.5, 0.2] + [0.1] * 12, -3.0),    # dominant eigenvalue is the most negative
    ([5.0, -2.0, 1.0, -0.5] + [0.3] * 12, -2.0),   # needs the shift to reach -2
    # Convex: the shifted run reaches the smallest eigenvalue, +0.5; stored signed, as the
    # original (docs/format.md), stage 2 fits its magnitude.
    ([2.0, 1.0] + [0.5] * 14, 0.5),
])
def test_curvature_of_a_quadratic_is_its_most_negative_eigenvalue(eigenvalues, expected):
    from estimate_gradient_norm import GradientNormEstimator

    est = GradientNormEstimator(quadratic_model(eigenvalues), (4, 4, 1), 32, order=2)
    x0 = np.zeros((4, 4, 1), np.float32)
    stats = list(est.iterate(x0, 0, [1, 2], 32, 3, 1, 0, BallSampler.create("l2", 0.3)))
    for st in stats:
        assert st.grad_max.shape == (2, 1)
        np.testing.assert_allclose(st.grad_max[:, 0], expected, rtol=0.01, atol=1e-4)


def test_order2_files_on_a_smooth_model(tmp_path, tanh_model_path, linear_weights):
    _run(["--model_path", tanh_model_path, "--order", "2", "-N", "32", "-i", "3", "-n", "2",
          "--targets", "top2", "--power_iters", "10", "-s", str(tmp_path), "-q", "--no_progress"])
    files = _mats(tmp_path)
    assert files and all(p.endswith("_order2.mat") for p in files)
    import tensorflow as tf
    import keras

    model = keras.saving.load_model(tanh_model_path)
    import models

    data = models.load_dataset("digits")
    for path in files:
        d = _load(path)
        assert {"H2_max", "g_x0_grad_2_norm", "g_x0", "pred", "id", "true_label",
                "target_label", "info", "args", "path"} <= set(d)
        assert "G2_max" not in d and d["order"].item() == 2
        h = d["H2_max"].ravel()
        # Signed curvature of largest magnitude (docs/format.md); stage 2 fits |H2_max|.
        assert h.size == 3 and np.all(np.isfinite(h)) and np.all(h != 0)
        c, j, i = d["true_label"].item(), d["target_label"].item(), d["id"].item()
        x = tf.constant(data.test_data[i:i + 1])
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x)
            g = out[:, c] - out[:, j]
        np.testing.assert_allclose(d["g_x0_grad_2_norm"].item(),
                                   np.linalg.norm(tape.gradient(g, x).numpy()), rtol=1e-5)


def test_order2_refuses_relu_models_unless_forced(tmp_path, capsys):
    import keras

    inp = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(inp))
    path = str(tmp_path / "relu.keras")
    keras.Model(inp, keras.layers.Dense(10)(hidden)).save(path)
    status = run_cli(collect_gradients.main, collect_gradients.parse_args,
                     ["--model_path", path, "--order", "2", "-s", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and "piecewise-linear" in err and "--force_order2" in err


def test_tiny_gradients_do_not_underflow_the_l2_norm():
    """float32 squares of 1e-20 underflow; the L2 norm must still be exact."""
    import tensorflow as tf

    from estimate_gradient_norm import GradientNormEstimator

    w = np.random.default_rng(5).normal(size=(16, 2)) * 1e-20
    wt = tf.constant(w, tf.float32)
    est = GradientNormEstimator(lambda x, training=False: tf.reshape(x, [-1, 16]) @ wt,
                                (4, 4, 1), 8)
    st = next(est.iterate(np.zeros((4, 4, 1), np.float32), 0, [1], 8, 1, 1, 0,
                          BallSampler.create("li", 0.1)))
    diff = w[:, 0].astype(np.float32).astype(np.float64) - w[:, 1].astype(np.float32)
    np.testing.assert_allclose(st.grad_max[0], [np.abs(diff).sum(), np.linalg.norm(diff),
                                                np.abs(diff).max()], rtol=1e-5)
    assert st.zero[0] == 0
