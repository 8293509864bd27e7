"""The Python API (api.py, re-exported by clever.py): one call on an in-memory model.

Known answers (a linear classifier's exact bound), the CLI's own numbers for
the same model saved to a file (a fresh interpreter, as a notebook would be),
stage 2 from arrays against stage 2 from a file, and the CLI's messages for
bad settings.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.io
import scipy.stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATS_L0 = re.compile(r"\[STATS\]\[L0\] info = (\w+), \w+_clever_L1 = (\S+), \w+_clever_L2 = "
                      r"(\S+), \w+_clever_Li = (\S+)$", re.M)
STATS_L1 = re.compile(r"\[STATS\]\[L1\] image = +(\d+), n_classes = +\d+, clever_L1 = (\S+), "
                      r"clever_L2 = (\S+), clever_Li = (\S+)$", re.M)

# Run in a fresh interpreter: import clever (no TensorFlow), build the model in memory,
# score with the API, save the model for the CLI. Prints one JSON line.
FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import clever
    tf_at_import = any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)
    import keras
    w, b = np.load(sys.argv[1]), np.load(sys.argv[2])
    inp = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10, activation="tanh")
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([w, b])
    model.save(sys.argv[3])
    import models
    data = models.load_dataset("digits")
    x, label = data.test_data[0], int(data.test_labels[0].argmax())
    kw = dict(Nsamps=32, Niters=20, seed=11, batch_size=32)
    t = clever.clever_t(model, x, "top2", label=label, **kw)
    u = clever.clever_u(model, x, label=label, **kw)
    np.save(sys.argv[4], t.files[0].record["G2_max"])
    print(json.dumps({"tf_at_import": tf_at_import, "t_bounds": t.bounds, "target": t.target,
                      "u_bounds": u.bounds, "u_targets": {k: v.target for k, v in u.norms.items()},
                      "u_files": len(u.files), "g1": t.files[0].record["G1_max"].tolist(),
                      "gi": t.files[0].record["Gi_max"].tolist()}))
""")


def _run(args, cwd):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_api_in_a_fresh_interpreter_equals_the_cli(tmp_path, linear_weights):
    w, b = linear_weights
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "b.npy", b)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    model_path = tmp_path / "lintanh.keras"
    out = _run([str(script), str(tmp_path / "w.npy"), str(tmp_path / "b.npy"),
                str(model_path), str(tmp_path / "g2.npy")], tmp_path)
    api = json.loads(out.strip().splitlines()[-1])
    assert api["tf_at_import"] is False

    flags = ["-d", "digits", "--model_path", str(model_path), "-n", "1", "-N", "32", "-i",
             "20", "--seed", "11", "--batch_size", "32", "-q"]
    collect = os.path.join(ROOT, "collect_gradients.py")
    clever = os.path.join(ROOT, "clever.py")
    _run([collect, *flags, "--targets", "top2", "-s", "t"], tmp_path)
    _run([collect, *flags, "--targets", "all", "-s", "u"], tmp_path)

    [mat_path] = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "t") for f in fs
                  if f.endswith(".mat")]
    mat = scipy.io.loadmat(mat_path, simplify_cells=True)
    # The arrays the CLI writes, bit for bit (same machine, same settings and seed).
    np.testing.assert_array_equal(np.load(tmp_path / "g2.npy"), mat["G2_max"])
    np.testing.assert_array_equal(np.asarray(api["g1"]), mat["G1_max"])
    np.testing.assert_array_equal(np.asarray(api["gi"]), mat["Gi_max"])
    assert int(mat["target_label"]) == api["target"]

    # The bounds clever.py prints (five significant digits).
    printed = STATS_L0.search(_run([clever, "t"], tmp_path))
    assert printed and printed.group(1) == "top2"
    for norm, text in zip(("L1", "L2", "Li"), printed.groups()[1:]):
        assert f"{api['t_bounds'][norm]:.5g}" == text

    line = STATS_L1.search(_run([clever, "u", "--untargeted"], tmp_path))
    assert line and int(line.group(1)) == 0
    for norm, text in zip(("L1", "L2", "Li"), line.groups()[1:]):
        assert f"{api['u_bounds'][norm]:.5g}" == text
    assert api["u_files"] == 9  # every class but the predicted one
    assert all(0 <= t <= 9 for t in api["u_targets"].values())


@pytest.fixture(scope="module")
def linear(linear_weights):
    import keras

    w, b = linear_weights
    inp = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10)
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([w, b])
    import models

    data = models.load_dataset("digits")
    return model, w, b, data


def _exact(w, b, x, c, j):
    """A linear classifier's bound g(x0) / ||w_c - w_j||_q per perturbation norm p."""
    logits = x.reshape(-1) @ w + b
    d = w[:, c] - w[:, j]
    g = logits[c] - logits[j]
    return {"L1": g / np.abs(d).max(), "L2": g / np.linalg.norm(d), "Li": g / np.abs(d).sum()}


def test_linear_classifier_known_bounds_every_target_form(linear):
    import clever

    model, w, b, data = linear
    x = data.test_data[3]
    c = int(np.argmax(x.reshape(-1) @ w + b))
    j = (c + 4) % 10
    kw = dict(Nsamps=8, Niters=5, seed=1, no_radius_cap=True)
    by_class = clever.clever_t(model, x, j, **kw)
    assert by_class.target == j and by_class.info == "user" and by_class.predicted == c
    for norm, value in _exact(w, b, x, c, j).items():
        assert by_class.norms[norm].bound == pytest.approx(value, rel=1e-5)
        assert by_class.norms[norm].bound_uncapped == pytest.approx(value, rel=1e-5)
    top2 = clever.clever_t(model, x, "top2", **kw)
    logits = x.reshape(-1) @ w + b
    assert top2.target == int(np.argsort(logits)[-2])
    # Untargeted: each norm's minimum over the nine classes and the class that gives it.
    u = clever.clever_u(model, x, **kw)
    for norm in ("L1", "L2", "Li"):
        exact = {k: _exact(w, b, x, c, k)[norm] for k in range(10) if k != c}
        best = min(exact, key=exact.get)
        assert u.norms[norm].target == best
        assert u.norms[norm].bound == pytest.approx(exact[best], rel=1e-5)


def test_batch_and_capped_bounds(linear):
    import clever

    model, w, b, data = linear
    x = data.test_data[:3]
    labels = data.test_labels[:3].argmax(1)
    out = clever.clever_batch(model, x, ("top2", "least"), labels=labels, Nsamps=8, Niters=4,
                              seed=2, untargeted=True)
    logits = x.reshape(3, -1) @ w + b
    correct = [i for i in range(3) if logits[i].argmax() == labels[i]]
    targeted = [r for r in out if r.info != "untargeted"]
    assert [(r.image, r.info) for r in targeted] == [(i, k) for i in correct
                                                     for k in ("least", "top2")]
    assert [r.image for r in out if r.info == "untargeted"] == correct
    for r in out:
        # The default bounds are capped at the sampling ball's radius in each norm
        # (docs/format.md): never above the uncapped ones.
        for s in r.norms.values():
            assert s.bound <= s.bound_uncapped + 1e-12
        assert r.settings["Nsamps"] == 8 and r.stage2["method"] == "mle_reg"
        assert r.provenance["versions"]["numpy"] == np.__version__


def test_nothing_written_unless_asked(linear, tmp_path, monkeypatch):
    import clever

    model, _, _, data = linear
    monkeypatch.chdir(tmp_path)
    r = clever.clever_t(model, data.test_data[0], "top2", Nsamps=8, Niters=3)
    assert os.listdir(tmp_path) == [] and r.files[0].path is None
    r = clever.clever_t(model, data.test_data[0], "top2", Nsamps=8, Niters=3, save="out")
    path = r.files[0].path
    assert path and os.path.exists(path) and path.startswith(os.path.join("out", "digits_"))
    np.testing.assert_array_equal(scipy.io.loadmat(path)["G2_max"].ravel(),
                                  r.files[0].record["G2_max"])


def test_bad_settings_raise_the_cli_message(linear):
    import clever
    from settings import SettingsError, Stage1Settings

    model, _, _, data = linear
    x = data.test_data[0]
    with pytest.raises(SettingsError) as api_err:
        clever.clever_t(model, x, "top2", Nsamps=-3)
    with pytest.raises(SettingsError) as cli_err:
        Stage1Settings.from_argv(["--Nsamps", "-3"])
    assert str(api_err.value) == str(cli_err.value) and "--Nsamps" in str(api_err.value)
    for kw, flag in ((dict(sample_norm="l3"), "--sample_norm"), (dict(Nsampz=3), "--Nsampz"),
                     (dict(method="best"), "--method"), (dict(shape_reg=-1), "--shape_reg"),
                     (dict(targets="top2"), "--targets")):
        with pytest.raises(SettingsError, match=re.escape(flag)) as err:
            clever.clever_t(model, x, "top2", **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(SettingsError, match="target"):
        clever.clever_t(model, x, "second", Nsamps=8)


def test_score_arrays_recovers_a_known_location_and_equals_a_file(tmp_path):
    import clever

    rng = np.random.default_rng(5)
    lipschitz = np.array([3.0, 1.5, 0.2])  # L1, L2, L-inf norms of the gradient
    # Batch maxima below each location: -weibull_min(c=3, loc=-L, scale=0.1 L).
    grad_max = np.stack([l - scipy.stats.weibull_min.rvs(3.0, scale=0.1 * l, size=400,
                                                         random_state=rng)
                         for l in lipschitz], axis=1)
    g_x0 = 0.9
    # The plain MLE (the default's scale penalty pulls a wide law's location up a little).
    mle = clever.score_arrays(grad_max, g_x0, radius=5.0, sample_norm="l2", dim=784,
                              method="mle")
    # Bound norm p uses the dual gradient norm q: L1 <- L-inf, L2 <- L2, L-inf <- L1.
    for norm, column in (("L1", 2), ("L2", 1), ("Li", 0)):
        assert mle[norm].lipschitz == pytest.approx(lipschitz[column], rel=0.02)
        assert mle[norm].bound_uncapped == pytest.approx(g_x0 / mle[norm].lipschitz)
        assert mle[norm].status == "fit"
    out = clever.score_arrays(grad_max, g_x0, radius=5.0, sample_norm="l2", dim=784)
    # The same record through a file and clever's folder scoring.
    record = {"G1_max": grad_max[:, 0], "G2_max": grad_max[:, 1], "Gi_max": grad_max[:, 2],
              "g_x0": g_x0, "id": 0, "true_label": 1, "target_label": 2, "info": "top2",
              "radius": 5.0, "sample_norm": "l2", "dim": 784}
    scipy.io.savemat(tmp_path / "16_400_0_1_2_top2_relu_order1.mat", record)
    folder = clever.score_folder(str(tmp_path))
    for norm, score in folder.files[0].scores.items():
        assert out[norm.label].bound == folder.reported(score)
        assert clever.score_maxima(record)[norm.label].bound == folder.reported(score)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.0, 255.0)])
def test_model_in_its_own_range(linear_weights, lo, hi):
    """A [-0.5, 0.5] network behind a Rescaling layer, scored on [lo, hi] images with
    data_range=(lo, hi): the inner network's bounds times the range's width."""
    import keras

    import clever
    import models

    w, b = linear_weights
    inner_in = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10, activation="tanh")
    inner = keras.Model(inner_in, dense(keras.layers.Flatten()(inner_in)))
    dense.set_weights([w, b])
    outer_in = keras.Input((28, 28, 1))
    to_inner = keras.layers.Rescaling(1.0 / (hi - lo), offset=-0.5 - lo / (hi - lo))
    outer = keras.Model(outer_in, inner(to_inner(outer_in)))
    x = models.load_dataset("digits").test_data[:2]
    kw = dict(Nsamps=16, Niters=6, seed=4)
    ref = clever.clever_t(inner, x, "top2", **kw)
    out = clever.clever_t(outer, (x + 0.5) * (hi - lo) + lo, "top2", data_range=(lo, hi), **kw)
    for r, o in zip(ref, out):
        assert o.target == r.target
        for norm in ("L1", "L2", "Li"):
            assert o.norms[norm].bound == pytest.approx(r.norms[norm].bound * (hi - lo),
                                                        rel=1e-4)
        assert o.settings["data_range"] == [lo, hi]


def test_interval_is_the_clis_and_interval_zero_has_none(tmp_path, capsys):
    """The result's interval (default 90%) equals clever.py --summary's for the same file;
    interval=0 leaves the bounds as they are and gives no interval; a bad level is refused."""
    import clever
    from settings import SettingsError

    rng = np.random.default_rng(11)
    grad_max = np.stack([l - scipy.stats.weibull_min.rvs(5.0, scale=0.2 * l, size=200,
                                                         random_state=rng)
                         for l in (3.0, 1.5, 0.2)], axis=1)
    record = {"G1_max": grad_max[:, 0], "G2_max": grad_max[:, 1], "Gi_max": grad_max[:, 2],
              "g_x0": 0.9, "id": 0, "true_label": 1, "target_label": 2, "info": "top2",
              "radius": 5.0, "sample_norm": "l2", "dim": 784}
    scipy.io.savemat(tmp_path / "16_200_0_1_2_top2_relu_order1.mat", record)
    summary = tmp_path / "s.json"
    assert clever.main(clever.parse_args([str(tmp_path), "--nthreads", "1",
                                          "--summary", str(summary)])) == 0
    capsys.readouterr()
    norms = json.load(open(summary))["records"][0]["norms"]
    got = clever.score_maxima(record)
    none = clever.score_maxima(record, interval=0)
    for label, res in got.items():
        assert res.bound_lo == norms[label]["bound_lo"] and res.bound_hi == norms[label]["bound_hi"]
        assert 0 < res.bound_lo <= res.bound <= res.bound_hi  # Li sits at its radius cap
        assert res.lipschitz_lo < res.lipschitz < res.lipschitz_hi
        assert none[label].bound == res.bound
        assert np.isnan([none[label].bound_lo, none[label].bound_hi]).all()
    assert got["L2"].bound_lo < got["L2"].bound < got["L2"].bound_hi
    narrow = clever.score_maxima(record, interval=0.5)["L2"]
    assert got["L2"].bound_lo < narrow.bound_lo < narrow.bound_hi < got["L2"].bound_hi
    for bad in (1.0, -0.1, "wide"):
        with pytest.raises(SettingsError, match="^--interval: "):
            clever.score_maxima(record, interval=bad)
