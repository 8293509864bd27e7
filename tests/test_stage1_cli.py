"""Stage 1's command line and output as the original tool's (issue 11, items 2, 6 and 8).

Targets drawn as the original (Python's ``random``), the TSV ``--ids`` file,
the printed ``[STATS][L1]`` lines, logits instead of probabilities, BPDA
around the untransformed image, and stage1.score_image's early-stop hook.
"""
import logging
import os
import random
import re

import numpy as np
import pytest
import scipy.io

import collect_gradients
import stage1
import utils
from common import TargetKind

NUM = r"[-+0-9.e]+|nan|inf"


def _run(argv):
    assert collect_gradients.main(collect_gradients.parse_args(argv)) == 0


def _mats(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".mat"))


def _digits():
    import models

    return models.load_dataset("digits")


def _linear_logits(weights, images):
    w, b = weights
    return images.reshape(len(images), -1).astype(np.float64) @ w + b


# --------------------------------------------------------------------------
# Target selection (no TensorFlow)
# --------------------------------------------------------------------------
def _reference_random_targets(rows, seed, start=0):
    """The original's procedure, written out: one randint loop per examined image, in order."""
    random.seed(seed)
    out = []
    for row in rows:
        row = np.asarray(row)
        predicted, least, top2 = int(np.argmax(row)), int(np.argmin(row)), int(np.argsort(row)[-2])
        cls = predicted
        while cls in (least, top2, predicted):
            cls = random.randint(start, start + len(row) - 1)
        out.append(cls)
    return out


def test_least_and_top2_on_hand_made_logits():
    logits = np.array([0.5, -2.0, 3.0, 1.0, 2.9, -1.0])
    assert utils.least_and_top2(logits) == (2, 1, 4)  # predicted, least (lowest), top-2 (second highest)
    targets = utils.select_targets(logits, [TargetKind.LEAST, TargetKind.TOP2, TargetKind.RANDOM],
                                   0, random_class=5)
    assert [(t.label, t.info) for t in targets] == [(1, "least"), (4, "top2"), (5, "random")]


def test_random_targets_follow_python_random_over_every_examined_image():
    rng = np.random.default_rng(3)
    n = 12
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[logits.argmax(1)]
    labels[[2, 7]] = np.roll(labels[[2, 7]], 1, axis=1)  # two misclassified images
    data = np.zeros((n, 2, 2, 1), np.float32)
    tasks = utils.generate_data(data, labels, logits, list(range(n)), [TargetKind.RANDOM], 1215)
    expected = _reference_random_targets(logits, 1215)
    assert [t.correct for t in tasks].count(False) == 2
    for task, want in zip(tasks, expected):
        if task.correct:
            assert [(t.label, t.info) for t in task.targets] == [(want, "random")]
        else:
            assert task.targets == []  # skipped, but its draw was made (the stream moved on)
    # Another seed draws other targets.
    other = utils.generate_data(data, labels, logits, list(range(n)), [TargetKind.RANDOM], 7)
    assert [t.targets for t in other] != [t.targets for t in tasks]


def test_background_class_is_never_a_target_of_a_1001_class_model():
    rng = np.random.default_rng(5)
    n = 40
    logits = rng.normal(size=(n, 1001)).astype(np.float32)
    logits[: n // 2, 0] = -50.0   # background the lowest logit: least must not be 0
    logits[n // 2:, 0] = 40.0     # background the second highest: top2 must not be 0
    logits[np.arange(n), 1 + np.arange(n) % 1000] = 50.0  # the prediction, never 0
    labels = np.eye(1000, dtype=np.float32)[logits[:, 1:].argmax(1)]
    kinds = [TargetKind.LEAST, TargetKind.TOP2, TargetKind.RANDOM]
    tasks = utils.generate_data(np.zeros((n, 1), np.float32), labels, logits, list(range(n)), kinds,
                                1215, excluded=(0,), label_offset=1)
    # The original drew randint(1, 1001) for a model with a background class.
    random.seed(1215)
    for task in tasks:
        assert task.correct and all(t.label != 0 for t in task.targets)
        row = task.logits.astype(np.float64)
        least = 1 + int(np.argmin(row[1:]))
        order = [j for j in np.argsort(row, kind="stable") if j != 0]
        top2 = int(order[-2])
        assert [t.label for t in task.targets[:2]] == [least, top2]
        cls = task.predicted
        while cls in (least, top2, task.predicted, 0) or cls > 1000:
            cls = random.randint(1, 1001)
        assert task.targets[2].label == cls


def test_tsv_ids_file_with_header_and_csv_form(tmp_path):
    tsv = tmp_path / "target.tsv"
    tsv.write_text("id\ttarget\tnew_class\n5\t1\t3\n3\t2\t0\n")
    assert utils.read_ids_file(str(tsv)) == ([5, 3], {5: [1], 3: [2]})
    ids_only = tmp_path / "ids.tsv"
    ids_only.write_text("id\tother\n4\tx\n9\ty\n")
    assert utils.read_ids_file(str(ids_only)) == ([4, 9], {})
    csv = tmp_path / "ids.csv"
    csv.write_text("id,targets\n5,1,2\n3\n")
    assert utils.read_ids_file(str(csv)) == ([5, 3], {5: [1, 2]})
    bad = tmp_path / "bad.tsv"
    bad.write_text("image\ttarget\n1\t2\n")
    with pytest.raises(Exception, match="no 'id' column"):
        utils.read_ids_file(str(bad))


# --------------------------------------------------------------------------
# collect_gradients.py
# --------------------------------------------------------------------------
def test_numimg_defaults_to_one_and_new_flags_parse():
    args = collect_gradients.parse_args([])
    assert args.numimg == 1 and args.power_iters == 500 and args.precision == "float32"
    assert not args.jit_compile and not args.fix_dirty_bug
    args = collect_gradients.parse_args(["--precision", "tf32", "--jit_compile", "--fix_dirty_bug"])
    assert args.precision == "tf32" and args.jit_compile and args.fix_dirty_bug


def test_same_command_picks_the_originals_random_targets(tmp_path, linear_model_path,
                                                         linear_weights, capsys):
    n = 8
    _run(["--model_path", linear_model_path, "-N", "8", "-i", "1", "-n", str(n), "--targets",
          "random", "-s", str(tmp_path), "-q", "--no_progress"])
    data = _digits()
    logits = _linear_logits(linear_weights, data.test_data[:n])
    expected = _reference_random_targets(logits, 1215)
    got = {scipy.io.loadmat(p)["id"].item(): scipy.io.loadmat(p)["target_label"].item()
           for p in _mats(tmp_path)}
    correct = [i for i in range(n) if logits[i].argmax() == data.test_labels[i].argmax()]
    assert sorted(got) == correct and correct
    assert got == {i: expected[i] for i in correct}


def test_printed_summary_lines_parse_and_match_the_files(tmp_path, linear_model_path, capsys):
    _run(["--model_path", linear_model_path, "-N", "16", "-i", "3", "-n", "2", "--targets",
          "top2,least", "-s", str(tmp_path), "--no_progress", "--compute_slope"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("{'dataset': 'digits'") and "'numimg': 2" in out[0]
    l2 = [x for x in out if x.startswith("[STATS][L2]")]
    assert l2 and all(re.fullmatch(
        rf"\[STATS\]\[L2\] loop = \d+, time = ({NUM}), iter_time = ({NUM}), overhead = ({NUM}), "
        rf"L2 = ({NUM}), L1 = ({NUM}), Linf = ({NUM}), G2 = ({NUM}), G1 = ({NUM}), Ginf = ({NUM}), "
        r"target_class = \d", x) for x in l2)
    summary = re.compile(rf"\[STATS\]\[L1\] g_x0 = ({NUM}), L2_max = ({NUM}), L1_max = ({NUM}), "
                         rf"Linf_max = ({NUM}), G2_max = ({NUM}), G1_max = ({NUM}), "
                         rf"Ginf_max = ({NUM})")
    bnd = re.compile(rf"\[STATS\]\[L1\] bnd_L2_max = ({NUM}), bnd_L1_max = ({NUM}), "
                     rf"bnd_Linf_max = ({NUM}), bnd_G2_max = ({NUM}), bnd_G1_max = ({NUM}), "
                     rf"bnd_Ginf_max = ({NUM})")
    total = re.compile(r"\[STATS\]\[L1\] total = (\d+), seq = (\d+), id = (\d+), time = ([0-9.]+), "
                       r"true_class = (\d), target_class = (\d), info = (\w+)")
    l1 = [x for x in out if x.startswith("[STATS][L1]")]
    assert len(l1) % 3 == 0 and len(l1) >= 6
    folder = tmp_path / "digits_linear"
    seqs, times = [], []
    for k in range(0, len(l1), 3):
        s, b, t = summary.fullmatch(l1[k]), bnd.fullmatch(l1[k + 1]), total.fullmatch(l1[k + 2])
        assert s and b and t, l1[k:k + 3]
        seqs.append(int(t.group(2)))
        times.append(float(t.group(4)))
        assert int(t.group(1)) == int(t.group(2)) + 1
        img, true, target, info = t.group(3), t.group(5), t.group(6), t.group(7)
        d = scipy.io.loadmat(folder / f"16_3_{img}_{true}_{target}_{info}_relu_order1.mat")
        g, G1, G2, Gi = (float(d[k].max()) for k in ("g_x0", "G1_max", "G2_max", "Gi_max"))
        L1, L2, Li = (float(d[k].max()) for k in ("L1_max", "L2_max", "Li_max"))
        values = [float(v) for v in s.groups()]
        np.testing.assert_allclose(values, [g, L2, L1, Li, G2, G1, Gi], rtol=1e-4)
        # Bounds with the dual norms: G2 for L2, G-inf for L1, G1 for L-inf.
        np.testing.assert_allclose([float(v) for v in b.groups()],
                                   [g / L2, g / Li, g / L1, g / G2, g / Gi, g / G1], rtol=1e-4)
    assert seqs == list(range(len(seqs)))  # (image, target) pairs counted from 0
    assert times == sorted(times)           # seconds since the run started


def test_bnd_line_without_slope_and_default_numimg(tmp_path, linear_model_path, capsys):
    _run(["--model_path", linear_model_path, "-N", "16", "-i", "2", "--targets", "top2",
          "-s", str(tmp_path), "-q", "--no_progress"])
    out = capsys.readouterr().out
    files = _mats(tmp_path)
    assert len(files) == 1  # --numimg 1: the first image only
    d = scipy.io.loadmat(files[0])
    m = re.search(rf"\[STATS\]\[L1\] bnd_G2_max = ({NUM}), bnd_G1_max = ({NUM}), "
                  rf"bnd_Ginf_max = ({NUM})\n", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(d["g_x0"].item() / d["G2_max"].max(), rel=1e-4)
    assert d["Niters_used"].item() == 2 and d["precision"].item() == "float32"
    assert d["jit_compile"].item() == 0
    assert "[STATS][L1] total = 1, seq = 0, id = 0," in out


def test_tsv_user_targets_and_fix_dirty_bug(tmp_path, linear_model_path, linear_weights, caplog):
    data = _digits()
    logits = _linear_logits(linear_weights, data.test_data[:6])
    ids = [i for i in range(6) if logits[i].argmax() == data.test_labels[i].argmax()][:2]
    want = {i: (int(logits[i].argmax()) + 1) % 10 for i in ids}
    tsv = tmp_path / "target.tsv"
    tsv.write_text("id\ttarget\tnew_class\n" + "".join(f"{i}\t{want[i]}\t0\n" for i in ids))
    with caplog.at_level(logging.WARNING):
        _run(["--model_path", linear_model_path, "-N", "8", "-i", "1", "-n", "2", "--ids", str(tsv),
              "--target_type", "0b01111", "--fix_dirty_bug", "-s", str(tmp_path / "out"), "-q",
              "--no_progress"])
    got = {(scipy.io.loadmat(p)["id"].item(), scipy.io.loadmat(p)["target_label"].item(),
            scipy.io.loadmat(p)["info"].item()) for p in _mats(tmp_path / "out")}
    assert got == {(i, want[i], "user") for i in ids}
    assert "--fix_dirty_bug" in caplog.text


def test_softmax_model_is_scored_on_its_logits(tmp_path, linear_weights, caplog):
    import keras

    w, b = linear_weights
    inp = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10, activation="softmax", name="probabilities")
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([w, b])
    path = str(tmp_path / "softmax.keras")
    model.save(path)
    with caplog.at_level(logging.WARNING):
        _run(["--model_path", path, "-N", "8", "-i", "2", "--targets", "top2", "-s",
              str(tmp_path / "out"), "-q", "--no_progress"])
    assert "'probabilities'" in caplog.text and "logits" in caplog.text
    (f,) = _mats(tmp_path / "out")
    d = scipy.io.loadmat(f)
    logits = _linear_logits(linear_weights, _digits().test_data[:1])[0]
    c, j = d["true_label"].item(), d["target_label"].item()
    assert d["g_x0"].item() == pytest.approx(logits[c] - logits[j], rel=1e-4)
    # The gradient is that of the logit difference: a constant w_c - w_j.
    np.testing.assert_allclose(d["G2_max"].ravel(), np.linalg.norm(w[:, c] - w[:, j]), rtol=1e-5)


def test_probabilities_without_a_softmax_layer_are_refused(linear_weights):
    import keras

    import models
    from common import ToolError

    w, b = linear_weights
    inp = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10)
    out = keras.layers.Lambda(lambda t: keras.ops.softmax(t))(dense(keras.layers.Flatten()(inp)))
    model = keras.Model(inp, out)
    dense.set_weights([w, b])
    assert models.logits_model(model, "lam.keras")[1] is None  # no softmax layer to remove
    with pytest.raises(ToolError) as err:
        models.check_logits(model, "lam.keras", (28, 28, 1))
    text = str(err.value)
    assert "\n" not in text and text.startswith("lam.keras:") and "probabilities" in text
    assert "without its final softmax" in text


def test_bpda_samples_are_drawn_around_the_untransformed_image(tmp_path, linear_model_path,
                                                               linear_weights, monkeypatch):
    import defense
    from estimate_gradient_norm import GradientNormEstimator

    seen = []
    original = GradientNormEstimator.iterate

    def spy(self, x0, *a, **kw):
        seen.append(np.array(x0))
        return original(self, x0, *a, **kw)

    monkeypatch.setattr(GradientNormEstimator, "iterate", spy)
    _run(["--model_path", linear_model_path, "-N", "8", "-i", "1", "--targets", "top2",
          "--transform", "defend_reduce", "-s", str(tmp_path), "-q", "--no_progress"])
    x0 = _digits().test_data[0]
    tx0 = defense.apply_transform("defend_reduce", x0[None])[0]
    assert len(seen) == 1 and np.array_equal(seen[0], x0) and not np.array_equal(seen[0], tx0)
    # g(x0) is still the defended classifier's: f(T(x0)).
    d = scipy.io.loadmat(_mats(tmp_path)[0])
    w, b = linear_weights
    logits = tx0.reshape(-1) @ w + b
    c, j = d["true_label"].item(), d["target_label"].item()
    assert d["g_x0"].item() == pytest.approx(logits[c] - logits[j], rel=1e-4)


# --------------------------------------------------------------------------
# stage1.score_image: the early-stop hook
# --------------------------------------------------------------------------
class _FakeStats:
    def __init__(self, it, n_targets):
        self.iteration = it
        self.grad_max = np.full((n_targets, 3), float(it + 1))
        self.slope_max = None
        self.nan = np.zeros(n_targets, np.int64)
        self.zero = np.zeros(n_targets, np.int64)
        self.seconds = self.wait = 0.0


class _FakeEstimator:
    """iterate() yields maxima 1, 2, 3... and records whether it was closed."""

    def __init__(self):
        self.closed = False
        self.kwargs = None

    def iterate(self, x0, c, targets, nsamps, niters, seed, img_id, sampler, pool=None,
                start_iter=0, sync_every=None):
        self.kwargs = dict(x0=x0, sync_every=sync_every)
        try:
            for it in range(niters):
                yield _FakeStats(it, len(targets))
        finally:
            self.closed = True


def test_score_image_stops_early_on_the_rule_and_keeps_the_iterations_run():
    task = utils.ImageTask(3, np.zeros((2, 2, 1), np.float32), 0, 0,
                           np.array([2.0, 0.5, -1.0], np.float32))
    targets = [utils.Target(1, TargetKind.TOP2, "top2"), utils.Target(2, TargetKind.LEAST, "least")]
    est = _FakeEstimator()
    calls = []

    def rule(done, grad):
        calls.append((done, grad.shape))
        return done >= 4, {"iteration": done}

    res = stage1.score_image(est, None, None, task, targets, task.image, nsamps=4, niters=10,
                             seed=1, order=1, stop_rule=rule, check_every=2)
    assert calls == [(2, (2, 2, 3)), (4, (4, 2, 3))]
    assert res.niters_used == 4 and res.checks == [{"iteration": 2}, {"iteration": 4}]
    assert est.closed and est.kwargs["sync_every"] == 2
    assert [r.g_x0 for r in res.results] == [1.5, 3.0]
    np.testing.assert_array_equal(res.results[0].grad_max[:, 1], [1, 2, 3, 4])
    record = stage1.mat_record(collect_gradients.parse_args(["-i", "10"]), task, targets[0],
                               res.results[0], "x.mat", model_name="m", dim=4, radius=3.0,
                               versions={})
    assert record["Niters_used"] == 4 and record["Niters"] == 10 and record["G2_max"].shape == (4,)
    # Without a rule every iteration runs.
    res = stage1.score_image(_FakeEstimator(), None, None, task, targets, task.image, nsamps=4,
                             niters=5, seed=1, order=1)
    assert res.niters_used == 5 and res.results[1].grad_max.shape == (5, 3)
