"""Tests of stage 2 (clever.py): the reverse Weibull fit, the scores and the CLI.

Synthetic stage-1 files are written here with scipy.io.savemat, named with
common.MatName and carrying the keys of docs/format.md, so the tests need
neither TensorFlow nor stage 1.
"""
import concurrent.futures
import csv
import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.io
from scipy.stats import weibull_min

import clever
import common
from common import Norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEVER_PY = os.path.join(ROOT, "clever.py")

NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:e[-+]\d+)?|inf|nan)"
DEBUG_RE = re.compile(
    rf"^\[DEBUG\]\[L1\] id = (?P<id>\d+), true_label = (?P<true>\d+), "
    rf"target_label = (?P<target>\d+), info = (?P<info>\w+), nsamps = (?P<nsamps>\d+), "
    rf"niters = (?P<niters>\d+), bnd_norm = (?P<norm>[12i]), bnd = (?P<bnd>{NUM}), "
    rf"ks = (?P<ks>{NUM}), pVal = (?P<pval>{NUM}), shape = (?P<shape>{NUM}), "
    rf"loc = (?P<loc>{NUM}), scale = (?P<scale>{NUM}), g_x0 = (?P<g>{NUM})$")
#: Method maxsamp: the original's line ends at the bound.
MAXSAMP_RE = re.compile(
    rf"^\[DEBUG\]\[L1\] id = (?P<id>\d+), true_label = (?P<true>\d+), "
    rf"target_label = (?P<target>\d+), info = (?P<info>\w+), nsamps = (?P<nsamps>\d+), "
    rf"niters = (?P<niters>\d+), bnd_norm = (?P<norm>[12i]), bnd = (?P<bnd>{NUM})$")
STATS_L0_RE = re.compile(
    rf"^\[STATS\]\[L0\] info = (?P<info>\w+), (?P=info)_clever_L1 = (?P<L1>{NUM}), "
    rf"(?P=info)_clever_L2 = (?P<L2>{NUM}), (?P=info)_clever_Li = (?P<Li>{NUM})$")
STATS_L0_ORDER2_RE = re.compile(
    rf"^\[STATS\]\[L0\] info = (?P<info>\w+), (?P=info)_clever_L2 = (?P<L2>{NUM})$")
STATS_L1_RE = re.compile(
    rf"^\[STATS\]\[L1\] image = (?P<image> *\d+), n_classes = (?P<n> *\d+), "
    rf"clever_L1 = (?P<L1>{NUM}), clever_L2 = (?P<L2>{NUM}), clever_Li = (?P<Li>{NUM})$")

#: Location (Lipschitz constant) of G1_max, G2_max, Gi_max in synthetic files.
LIPS = {"G1_max": 30.0, "G2_max": 2.0, "Gi_max": 0.3}


def reverse_weibull(loc, shape, scale, n, rng):
    """n maxima below ``loc``: S = loc - W, W ~ weibull_min(shape, scale)."""
    return loc - weibull_min.rvs(shape, scale=scale, size=n, random_state=rng)


def write_stage1(folder, img_id, target, info, *, true_label=0, niters=100, nsamps=1024,
                 g_x0=1.5, seed=0, extra=None, drop=(), arrays=None, order=1,
                 activation="relu"):
    """A stage-1 file with the keys of docs/format.md (this toolkit's layout)."""
    rng = np.random.default_rng([seed, img_id, target])
    data = {}
    if order == 1:
        for key, loc in LIPS.items():
            data[key] = reverse_weibull(loc, 3.0, 0.2 * loc, niters, rng)
            data["L" + key[1:]] = np.zeros(niters)
    data.update(g_x0=np.array([g_x0], np.float32), pred=rng.normal(size=10), id=img_id,
                true_label=true_label, target_label=target, info=info,
                args={"sample_norm": "l2", "Nsamps": nsamps, "Niters": niters},
                path="synthetic", radius=3.0, sample_norm="l2", dim=784, seed=1215)
    data.update(arrays or {})
    data.update(extra or {})
    for key in drop:
        data.pop(key, None)
    os.makedirs(folder, exist_ok=True)
    name = common.MatName(nsamps, niters, img_id, true_label, target, info, activation, order)
    path = os.path.join(folder, name.filename())
    scipy.io.savemat(path, data)
    return path


def targeted_folder(folder, n_images=2, **kw):
    paths = []
    for img in range(n_images):
        for info, target in (("least", 3), ("random", 5), ("top2", 8)):
            paths.append(write_stage1(folder, img, target, info, **kw))
    return paths


def run_main(argv, capsys):
    status = clever.main(clever.parse_args(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def run_script(argv, cwd):
    return subprocess.run([sys.executable, CLEVER_PY, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------
# (shape c, location L, scale, number of maxima). For c > 2 the location MLE
# has a standard error of order scale / sqrt(n), so scale / L is kept where 2%
# of L is a few standard errors; with c = 4.1 and scale / L = 0.23 (the format's
# example line) no estimator gets within 2% that often (an MLE started at the
# true parameters with tight tolerances does no better: about 70% at n = 500).
# The original's procedure (fmin's loose tolerances, the scale penalty) gets
# 34 to 40 of 40 draws within 2% on these cases, median error at most 1.1%.
RECOVERY = [
    (1.0, 1.0, 0.5, 300),
    (1.5, 2.0, 0.5, 100),
    (1.5, 2.0, 0.5, 500),
    (2.5, 3.0, 0.3, 100),
    (2.5, 3.0, 0.5, 500),
    (4.1, 2.3, 0.1, 200),
    (10.0, 10.0, 0.3, 100),
    (10.0, 10.0, 0.5, 500),
]
DRAWS = 40


@pytest.fixture(scope="module")
def fit_pool():
    """Processes for the draws of the recovery tests (each fit is single-threaded)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield pool


def _fit_draw(loc, shape, scale, n, seed):
    """(estimate, K-S p-value) of the fit to one draw of n reverse Weibull maxima."""
    fit = clever.fit_reverse_weibull(reverse_weibull(loc, shape, scale, n,
                                                     np.random.default_rng(seed)))
    return fit.estimate, fit.pval


@pytest.mark.parametrize("shape,loc,scale,n", RECOVERY)
def test_recovers_reverse_weibull_location(shape, loc, scale, n, fit_pool):
    close = good_p = 0
    errors = []
    seeds = [[draw, int(shape * 10), n, int(scale * 100)] for draw in range(DRAWS)]
    for estimate, pval in fit_pool.map(functools.partial(_fit_draw, loc, shape, scale, n),
                                       seeds):
        close += abs(estimate - loc) <= 0.02 * loc
        errors.append(abs(estimate - loc) / loc)
        good_p += pval > 0.05
    assert close >= 0.8 * DRAWS, f"{close}/{DRAWS} estimates within 2% of {loc}"
    assert np.median(errors) < 0.015, f"median relative error {np.median(errors):.3g}"
    assert good_p >= 0.90 * DRAWS, f"{good_p}/{DRAWS} K-S p-values above 0.05"


def test_location_recovered_for_shape_below_one(fit_pool):
    # For c < 1 the Weibull likelihood is unbounded at loc -> min(-S), so the
    # K-S p-values are not asserted; the estimate is still within 2% because
    # the maxima crowd at the end point.
    fits = fit_pool.map(functools.partial(_fit_draw, 2.0, 0.8, 1.0, 300),
                        [[draw, 8] for draw in range(20)])
    close = sum(abs(estimate - 2.0) <= 0.04 for estimate, _ in fits)
    assert close >= 19


def test_fit_result_fields_are_consistent():
    samples = reverse_weibull(2.0, 3.0, 0.4, 300, np.random.default_rng(1))
    fit = clever.fit_reverse_weibull(samples)
    assert fit.status is clever.FitStatus.FIT and not fit.fallback
    assert fit.loc == -fit.estimate
    assert fit.estimate > samples.max()  # the support of -S starts at loc
    assert fit.scale > 0 and fit.shape > 0 and 0 < fit.ks < 1 and fit.pval == fit.best_pval
    assert fit.c_init in clever.C_INIT and fit.n_used == 300 and fit.n_dropped == 0
    # The fit is invariant to the units of S: rescaling S rescales loc and scale.
    scaled = clever.fit_reverse_weibull(samples * 1000.0)
    assert scaled.estimate == pytest.approx(1000.0 * fit.estimate, rel=1e-3)
    assert scaled.shape == pytest.approx(fit.shape, rel=1e-3)


def _no_warnings(func, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = func(*args, **kw)
    assert not caught, [str(w.message) for w in caught]
    return result


@pytest.mark.parametrize("method", ["mle", "mle_reg", "maxsamp"])
def test_all_equal_maxima_give_that_value_exactly(method):
    value = np.float32(0.7312)  # a linear model: every batch maximum is ||w_c - w_j||
    fit = _no_warnings(clever.fit_reverse_weibull, np.full(500, value), method)
    assert fit.estimate == float(value)
    assert fit.loc == -float(value) and fit.pval == -1.0


def test_float32_noise_is_treated_as_one_value():
    value = 3.25
    eps = np.finfo(np.float32).eps
    noisy = (value * (1 + np.array([0, 1, 2, 3] * 50) * eps)).astype(np.float32)
    assert np.unique(noisy).size == 4
    fit = _no_warnings(clever.fit_reverse_weibull, noisy)
    assert fit.status is clever.FitStatus.DEGENERATE
    assert fit.estimate == float(noisy.max())


def test_two_distinct_values_give_the_maximum():
    samples = np.array([1.0, 2.0] * 100)
    fit = _no_warnings(clever.fit_reverse_weibull, samples)
    assert fit.status is clever.FitStatus.DEGENERATE and fit.fallback
    assert fit.estimate == 2.0


def test_nan_entries_are_dropped_and_counted():
    samples = reverse_weibull(2.0, 3.0, 0.4, 300, np.random.default_rng(2))
    with_nan = samples.copy()
    with_nan[[3, 50, 299]] = [np.nan, np.inf, np.nan]
    fit = clever.fit_reverse_weibull(with_nan)
    clean = clever.fit_reverse_weibull(np.delete(samples, [3, 50, 299]))
    assert fit.n_dropped == 3 and fit.n_used == 297
    assert fit.estimate == clean.estimate and fit.pval == clean.pval


def test_all_nan_and_all_zero_are_flagged():
    none = _no_warnings(clever.fit_reverse_weibull, np.full(50, np.nan))
    assert none.status is clever.FitStatus.NO_DATA and math.isnan(none.estimate)
    zero = _no_warnings(clever.fit_reverse_weibull, np.zeros(50))
    assert zero.status is clever.FitStatus.ALL_ZERO and zero.estimate == 0.0 and zero.fallback
    assert math.isinf(clever.clever_bound(1.2, zero.estimate))


def test_maxsamp_uses_the_sample_maximum():
    samples = reverse_weibull(2.0, 3.0, 0.4, 200, np.random.default_rng(3))
    fit = clever.fit_reverse_weibull(samples, "maxsamp")
    assert fit.estimate == samples.max() and fit.status is clever.FitStatus.MAXSAMP
    assert not fit.fallback and fit.shape == -1.0


def test_ill_conditioned_maxima_fall_back_to_the_maximum():
    # Two tight clusters: no Weibull passes the K-S test.
    rng = np.random.default_rng(4)
    samples = np.concatenate([1.0 + 1e-3 * rng.random(250), 2.0 + 1e-3 * rng.random(250)])
    fit = _no_warnings(clever.fit_reverse_weibull, samples)
    assert fit.status is clever.FitStatus.ILL_CONDITIONED and fit.fallback
    assert fit.estimate == samples.max() and fit.best_pval < clever.MIN_PVALUE


def test_mle_and_mle_reg():
    samples = reverse_weibull(2.0, 4.0, 0.3, 200, np.random.default_rng(5))
    mle = clever.fit_reverse_weibull(samples, "mle")
    reg = clever.fit_reverse_weibull(samples, "mle_reg")
    # mle ignores shape_reg; mle_reg with no penalty is plain MLE.
    assert clever.fit_reverse_weibull(samples, "mle", shape_reg=5.0) == mle
    assert clever.fit_reverse_weibull(samples, "mle_reg", shape_reg=0.0) == mle
    # The default penalty barely moves a well-conditioned fit...
    assert reg.estimate == pytest.approx(mle.estimate, rel=0.01)
    # ...a heavy one pulls the penalised parameter of the rescaled fit down: the
    # scale by default (the original's theta[2], docs/format.md), c with "shape".
    heavy = clever.fit_reverse_weibull(samples, "mle_reg", shape_reg=3.0)
    assert heavy.scale < 0.95 * mle.scale
    heavy_c = clever.fit_reverse_weibull(samples, "mle_reg", shape_reg=3.0, penalize="shape")
    assert heavy_c.shape < 0.8 * mle.shape


def test_mle_is_scipys_fit_with_fmin():
    """Plain mle is weibull_min.fit with scipy.optimize.fmin, as the original's mle."""
    import scipy.optimize

    import weibull_fit

    assert weibull_fit.nelder_mead(0.0, 2) is scipy.optimize.fmin
    s = reverse_weibull(2.0, 3.0, 0.4, 300, np.random.default_rng(6))
    shift, spread = s.max(), s.max() - s.min()
    c, loc, scale = weibull_min.fit(-(s - shift) / spread, 5.0, optimizer=scipy.optimize.fmin)
    trial = next(t for t in clever.fit_reverse_weibull(s, "mle").trials if t.c_init == 5.0)
    assert (trial.c, trial.loc, trial.scale) == pytest.approx(
        (c, -shift + loc * spread, scale * spread), rel=1e-12)


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------
def test_second_order_bound_closed_form_and_limit():
    rng = np.random.default_rng(7)
    for g, a, h in rng.uniform(0.1, 5.0, size=(20, 3)):
        closed = (-a + math.sqrt(a * a + 2 * g * h)) / h
        assert clever.second_order_bound(g, a, h) == pytest.approx(closed, rel=1e-12)
    # H -> 0: the first-order bound g / ||grad||, with no 0/0.
    assert clever.second_order_bound(1.5, 3.0, 0.0) == 0.5
    assert clever.second_order_bound(1.5, 3.0, 1e-300) == pytest.approx(0.5, rel=1e-12)
    # No gradient at x0: sqrt(2 g / H).
    assert clever.second_order_bound(2.0, 0.0, 1.0) == pytest.approx(2.0)


def test_radius_cap_by_norm():
    r = 3.0
    assert clever.cap_for(r, Norm.L2, Norm.L2, None) == r
    assert clever.cap_for(r, Norm.L2, Norm.L1, None) == r
    assert clever.cap_for(r, Norm.L2, Norm.LINF, None) is None  # needs the dimension
    assert clever.cap_for(r, Norm.L2, Norm.LINF, 100) == pytest.approx(0.3)
    assert clever.cap_for(0.1, Norm.LINF, Norm.LINF, None) == 0.1


# --------------------------------------------------------------------------
# The CLI on synthetic folders
# --------------------------------------------------------------------------
def _summary(path):
    with open(path) as fh:
        return json.load(fh)


def _last_stats(lines):
    """The last [STATS] line (an [INTERVAL] line follows it at the default --interval)."""
    return [line for line in lines if line.startswith("[STATS]")][-1]


def test_targeted_lines_and_mean(tmp_path, capsys):
    data = tmp_path / "mnist_normal"
    targeted_folder(str(data), n_images=2)
    summary = tmp_path / "out" / "summary.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--summary", str(summary)],
                                capsys)
    assert status == 0
    debug = [DEBUG_RE.match(line) for line in lines if line.startswith("[DEBUG]")]
    stats = [STATS_L0_RE.match(line) for line in lines if line.startswith("[STATS]")]
    assert len(debug) == 18 and all(debug), lines
    assert len(stats) == 3 and all(stats), lines
    # The original's 21 lines, then an [INTERVAL][L0] line per [STATS][L0] line.
    assert len(lines) == 24 and not any(x.startswith("[INTERVAL]") for x in lines[:21])
    assert [x.split(",")[0] for x in lines[21:]] == [
        f"[INTERVAL][L0] info = {m['info']}" for m in stats]
    # Sorted by image id, then info, then norm.
    keys = [(int(m["id"]), m["info"], m["norm"]) for m in debug]
    assert keys == sorted(keys, key=lambda k: (k[0], k[1], "12i".index(k[2])))
    assert [m["info"] for m in stats] == ["least", "random", "top2"]

    records = _summary(summary)["records"]
    for m in stats:
        for label in ("L1", "L2", "Li"):
            bounds = [r["norms"][label]["bound"] for r in records if r["info"] == m["info"]]
            assert len(bounds) == 2
            assert m[label] == f"{np.mean(bounds):.5g}"
    # The L2 bound is g_x0 / est(G2_max) and close to 1.5 / 2.0.
    for r in records:
        l2 = r["norms"]["L2"]
        assert l2["key"] == "G2_max" and l2["bound_uncapped"] == pytest.approx(1.5 / l2["estimate"])
        assert l2["estimate"] == pytest.approx(LIPS["G2_max"], rel=0.05)
        assert r["norms"]["L1"]["key"] == "Gi_max" and r["norms"]["Li"]["key"] == "G1_max"


def test_min_reports_the_minimum(tmp_path, capsys):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=2, niters=60)
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--min", "--method", "maxsamp",
                                 "--summary", str(summary)], capsys)
    assert status == 0
    records = _summary(summary)["records"]
    stats = [STATS_L0_RE.match(line) for line in lines if line.startswith("[STATS]")]
    assert len(stats) == 3
    for m in stats:
        for label in ("L1", "L2", "Li"):
            bounds = [r["norms"][label]["bound"] for r in records if r["info"] == m["info"]]
            assert m[label] == f"{min(bounds):.5g}"


def test_untargeted_minimum_per_image(tmp_path, capsys):
    data = tmp_path / "d"
    for img, true in ((4, 1), (11, 7)):
        for j in range(10):
            if j != true:
                write_stage1(str(data), img, j, f"class{j}", true_label=true, niters=60,
                             g_x0=0.5 + 0.2 * j)
    # Untargeted takes every file of an image, as the original (run.sh's "all"
    # collects top2, random and least files): this one sets image 4's minimum.
    write_stage1(str(data), 4, 2, "top2", true_label=1, niters=60, g_x0=0.01)
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--untargeted", "--nthreads", "1",
                                 "--summary", str(summary)], capsys)
    assert status == 0
    per_image = [STATS_L1_RE.match(line) for line in lines if line.startswith("[STATS][L1]")]
    overall = [STATS_L0_RE.match(line) for line in lines if line.startswith("[STATS][L0]")]
    assert len(per_image) == 2 and all(per_image) and len(overall) == 1 and overall[0]
    assert overall[0]["info"] == "untargeted"
    assert [m["image"] for m in per_image] == ["  4", " 11"]
    assert [m["n"] for m in per_image] == [" 11", " 10"]
    records = _summary(summary)["records"]
    assert len(records) == 19 and sum(r["info"] == "top2" for r in records) == 1
    mins = {}
    for m in per_image:
        img = int(m["image"])
        for label in ("L1", "L2", "Li"):
            value = min(r["norms"][label]["bound"] for r in records if r["id"] == img)
            assert m[label] == f"{value:.5g}"
            mins.setdefault(label, []).append(value)
    for label in ("L1", "L2", "Li"):
        assert overall[0][label] == f"{np.mean(mins[label]):.5g}"


def test_radius_cap_and_no_radius_cap(tmp_path, capsys):
    data = tmp_path / "d"
    # g_x0 / L2 = 12 / 2 = 6 > radius 3; Li cap 3 / sqrt(dim 100) = 0.3.
    write_stage1(str(data), 0, 1, "top2", g_x0=12.0, niters=80, extra={"dim": 100})
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--summary", str(summary)],
                                capsys)
    assert status == 0
    norms = _summary(summary)["records"][0]["norms"]
    assert norms["L2"]["cap"] == 3.0 and norms["L2"]["bound"] == 3.0
    assert norms["L2"]["bound_uncapped"] == pytest.approx(6.0, rel=0.05)
    assert norms["Li"]["cap"] == pytest.approx(0.3)
    assert norms["Li"]["bound"] == min(norms["Li"]["bound_uncapped"], norms["Li"]["cap"])
    stats = STATS_L0_RE.match(_last_stats(lines))
    assert stats["L2"] == "3"

    status, lines, _ = run_main([str(data), "--nthreads", "1", "--no_radius_cap"], capsys)
    stats = STATS_L0_RE.match(_last_stats(lines))
    assert stats["L2"] == f"{norms['L2']['bound_uncapped']:.5g}"
    assert float(stats["L2"]) > 5


def test_radius_and_sample_norm_keys_are_used(tmp_path, capsys):
    data = tmp_path / "d"
    write_stage1(str(data), 0, 1, "top2", g_x0=12.0, niters=60,
                 extra={"radius": 0.5, "sample_norm": "li", "dim": 100})
    summary = tmp_path / "s.json"
    run_main([str(data), "--nthreads", "1", "--method", "maxsamp", "--summary", str(summary)],
             capsys)
    norms = _summary(summary)["records"][0]["norms"]
    # An Linf ball of radius 0.5 holds the Linf ball of 0.5, the L2 ball of 0.5
    # and the L1 ball of 0.5.
    assert norms["Li"]["cap"] == norms["L2"]["cap"] == norms["L1"]["cap"] == 0.5


def test_original_tool_layout_is_read(tmp_path, capsys, caplog):
    data = tmp_path / "lipschitz_mat" / "imagenet_resnet"
    data.mkdir(parents=True)
    rng = np.random.default_rng(8)
    n = 80
    # As the original saved it: float32 row vectors, Python ints, a string
    # info, and args as a dict (a MATLAB struct) with no radius or dim keys.
    mat = {key: reverse_weibull(loc, 3.0, 0.2 * loc, n, rng).astype(np.float32)
           for key, loc in LIPS.items()}
    mat.update(L1_max=np.zeros(n, np.float32), L2_max=np.zeros(n, np.float32),
               Li_max=np.zeros(n, np.float32), pred=rng.normal(size=1001).astype(np.float32),
               g_x0=np.float32(9.0), id=23, true_label=65, target_label=901, info="user",
               args={"dataset": "imagenet", "model_name": "resnet_v2_50", "Nsamps": 32,
                     "Niters": n, "sample_norm": "l2", "seed": 1215, "target_type": 15},
               path="lipschitz_mat/imagenet_resnet/32_80_23_65_901_user")
    scipy.io.savemat(str(data / f"32_{n}_23_65_901_user_relu_order1.mat"), mat)
    # Loaded the raw way, the layout really is the original's.
    raw = scipy.io.loadmat(str(data / f"32_{n}_23_65_901_user_relu_order1.mat"))
    assert raw["G2_max"].shape == (1, n) and raw["id"].shape == (1, 1)
    assert raw["args"].dtype.names and raw["info"][0] == "user"

    summary = tmp_path / "s.json"
    caplog.set_level("DEBUG", logger="clever")
    status, lines, _ = run_main([str(tmp_path / "lipschitz_mat"), "--nthreads", "1",
                                 "--user_type", "top2", "--summary", str(summary)], capsys)
    assert status == 0
    debug = [DEBUG_RE.match(line) for line in lines[:3]]
    assert all(debug) and debug[0]["id"] == "23" and debug[0]["info"] == "top2"
    assert debug[0]["target"] == "901" and debug[0]["nsamps"] == "32"
    assert STATS_L0_RE.match(lines[3])["info"] == "top2"
    rec = _summary(summary)["records"][0]
    assert rec["radius"] == 3.0 and rec["sample_norm"] == "l2" and rec["dim"] is None
    assert rec["file_provenance"]["args"]["model_name"] == "resnet_v2_50"
    assert rec["norms"]["L2"]["cap"] == 3.0 and rec["norms"]["Li"]["cap"] is None
    assert rec["norms"]["Li"]["bound"] == rec["norms"]["Li"]["bound_uncapped"]
    assert "not capped" in caplog.text

    # Without --user_type the info stays "user".
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--method", "maxsamp"], capsys)
    assert STATS_L0_RE.match(_last_stats(lines))["info"] == "user"


def test_early_original_file_names_without_activation_and_order(tmp_path):
    # The first releases named files <Nsamp>_<Niters>_<id>_<true>_<target>_<info>.mat.
    path = write_stage1(str(tmp_path), 3, 4, "least", true_label=2, niters=40, nsamps=512)
    old = os.path.join(str(tmp_path), "512_40_3_2_4_least.mat")
    os.rename(path, old)
    f = clever.load_stage1_file(old)
    assert (f.order, f.img_id, f.true_label, f.target_label, f.info) == (1, 3, 2, 4, "least")
    assert f.nsamps == 512 and f.niters == 40


def test_original_args_struct_sets_the_sampling_ball(tmp_path, capsys):
    data = tmp_path / "d"
    path = write_stage1(str(data), 0, 1, "top2", niters=50, drop=("radius", "sample_norm",
                                                                   "dim"),
                        extra={"args": {"sample_norm": "li", "dataset": "cifar"}})
    f = clever.load_stage1_file(path)
    assert f.sample_norm is Norm.LINF and f.radius == 0.1 and f.dim == 3072
    assert clever.load_stage1_file(path, num_samples=20).maxima[Norm.L2].size == 20


def test_order2_bound_against_closed_form(tmp_path, capsys):
    data = tmp_path / "d"
    g, a, h = 1.2, 2.5, 0.8
    for img in range(2):
        # All curvature maxima equal (and stored negative, as some original
        # runs did): the estimate is exactly |h|.
        write_stage1(str(data), img, 1, "top2", order=2, niters=50, g_x0=g,
                     arrays={"H2_max": np.full(50, -h), "g_x0_grad_2_norm": a})
    write_stage1(str(data), 2, 1, "top2", order=2, niters=200, g_x0=g,
                 arrays={"H2_max": reverse_weibull(h, 3.0, 0.2, 200, np.random.default_rng(9)),
                         "g_x0_grad_2_norm": a})
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--summary", str(summary)],
                                capsys)
    assert status == 0
    debug = [DEBUG_RE.match(line) for line in lines if line.startswith("[DEBUG]")]
    stats = [line for line in lines if line.startswith("[STATS]")]
    assert len(debug) == 3 and all(m["norm"] == "2" for m in debug)
    assert len(stats) == 1 and STATS_L0_ORDER2_RE.match(stats[0])
    records = _summary(summary)["records"]
    g = records[0]["g_x0"]  # g_x0 was stored as float32
    assert g == pytest.approx(1.2, rel=1e-7)
    closed = (-a + math.sqrt(a * a + 2 * g * h)) / h
    for r in records[:2]:
        assert set(r["norms"]) == {"L2"} and r["norms"]["L2"]["estimate"] == h
        assert r["g_x0_grad_2_norm"] == a
        assert r["norms"]["L2"]["bound_uncapped"] == pytest.approx(closed, rel=1e-12)
    est = records[2]["norms"]["L2"]["estimate"]
    assert est == pytest.approx(h, rel=0.1)
    assert records[2]["norms"]["L2"]["bound_uncapped"] == pytest.approx(
        (-a + math.sqrt(a * a + 2 * g * est)) / est, rel=1e-12)
    mean = np.mean([r["norms"]["L2"]["bound"] for r in records])
    assert STATS_L0_ORDER2_RE.match(stats[0])["L2"] == f"{mean:.5g}"


def test_summary_json_and_csv(tmp_path, capsys):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=1, niters=60)
    summary = tmp_path / "out" / "run.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--summary", str(summary)],
                                capsys)
    assert status == 0
    doc = _summary(summary)
    assert doc["provenance"]["args"]["summary"] == str(summary)
    # TensorFlow's version appears only if some other code of the process imported it
    # (stage 2 itself never does: test_stage2_never_imports_tensorflow).
    versions = doc["provenance"]["versions"]
    assert "scipy" in versions and ("tensorflow" in versions) == ("tensorflow" in sys.modules)
    assert doc["order"] == 1 and doc["reported_bounds"] == "capped" and doc["errors"] == []
    assert len(doc["records"]) == 3
    rec = doc["records"][0]
    assert {"path", "id", "true_label", "target_label", "info", "order", "nsamps", "niters",
            "g_x0", "norms", "file_provenance"} <= set(rec)
    for label in ("L1", "L2", "Li"):
        assert {"estimate", "shape", "loc", "scale", "ks", "pval", "bound", "bound_uncapped",
                "cap", "fallback"} <= set(rec["norms"][label])
    assert rec["file_provenance"]["seed"] == 1215 and rec["file_provenance"]["radius"] == 3.0
    aggs = doc["aggregates"]
    assert [a["info"] for a in aggs] == ["least", "random", "top2"]
    for a, line in zip(aggs, [line for line in lines if line.startswith("[STATS]")]):
        assert STATS_L0_RE.match(line)["L2"] == f"{a['clever_L2']:.5g}"

    with open(tmp_path / "out" / "run.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    for row, rec in zip(rows, doc["records"]):
        assert row["path"] == rec["path"] and int(row["id"]) == rec["id"]
        for label in ("L1", "L2", "Li"):
            assert float(row[f"{label}_bound"]) == rec["norms"][label]["bound"]
            assert float(row[f"{label}_pval"]) == rec["norms"][label]["pval"]
            assert row[f"{label}_fallback"] == str(rec["norms"][label]["fallback"])


def test_num_samples_and_num_images(tmp_path, capsys):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=3, niters=80)
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--num_samples", "30",
                                 "--num_images", "2", "--summary", str(summary)], capsys)
    assert status == 0
    records = _summary(summary)["records"]
    assert sorted({r["id"] for r in records}) == [0, 1] and len(records) == 6
    assert all(r["norms"][n]["n_used"] == 30 for r in records for n in ("L1", "L2", "Li"))
    first = clever.fit_reverse_weibull(
        scipy.io.loadmat(records[0]["path"])["G2_max"].ravel()[:30])
    assert records[0]["norms"]["L2"]["estimate"] == first.estimate


def test_use_slope_fits_slope_keys_and_reports_zeros(tmp_path, capsys, caplog):
    data = tmp_path / "d"
    write_stage1(str(data), 0, 1, "top2", niters=40)
    summary = tmp_path / "s.json"
    status, lines, _ = run_main([str(data), "--nthreads", "1", "--use_slope",
                                 "--summary", str(summary)], capsys)
    assert status == 0
    norms = _summary(summary)["records"][0]["norms"]
    assert norms["L2"]["key"] == "L2_max" and norms["L1"]["key"] == "Li_max"
    assert norms["L2"]["status"] == "all_zero" and norms["L2"]["bound"] == 3.0
    assert norms["L2"]["bound_uncapped"] is None  # infinite, written as null
    assert "every maximum is 0" in caplog.text and "--compute_slope" in caplog.text


def test_nan_maxima_are_reported(tmp_path, capsys, caplog):
    data = tmp_path / "d"
    g2 = reverse_weibull(2.0, 3.0, 0.4, 60, np.random.default_rng(10))
    g2[5] = np.nan
    path = write_stage1(str(data), 0, 1, "top2", niters=60, arrays={"G2_max": g2})
    status, lines, _ = run_main([str(data), "--nthreads", "1"], capsys)
    assert status == 0
    assert "dropped 1 NaN/inf maxima" in caplog.text and path in caplog.text


def test_plot_dir_writes_a_png_per_fit_and_a_summary(tmp_path, capsys):
    data = tmp_path / "d"
    paths = targeted_folder(str(data), n_images=1, niters=50)
    plots = tmp_path / "plots"
    status, _, _ = run_main([str(data), "--nthreads", "1", "--plot_dir", str(plots)], capsys)
    assert status == 0
    names = sorted(os.listdir(plots))
    expected = sorted(os.path.basename(p)[:-4] + f"_{n}.png" for p in paths
                      for n in ("L1", "L2", "Li"))
    assert names == sorted(expected + ["clever_summary_L2.png"])
    for name in names:
        with open(plots / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_parallel_equals_serial(tmp_path, capsys):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=2, niters=100)
    outs = {}
    for n in ("1", "2"):
        summary = tmp_path / f"s{n}.json"
        status, lines, _ = run_main([str(data), "--nthreads", n, "--summary", str(summary)],
                                    capsys)
        assert status == 0
        outs[n] = (lines, _summary(summary)["records"])
    assert outs["1"][0] == outs["2"][0]
    assert outs["1"][1] == outs["2"][1]  # every fit field, exactly


def test_score_folder_api(tmp_path):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=1, niters=50)
    result = clever.score_folder(str(data), clever.Options(method=clever.Method.MAXSAMP))
    assert result.order == 1 and not result.errors and len(result.files) == 3
    fs = result.files[0]
    g2 = scipy.io.loadmat(fs.file.path)["G2_max"].ravel()
    assert fs.scores[Norm.L2].fit.estimate == g2.max()
    assert fs.scores[Norm.L2].bound_uncapped == pytest.approx(1.5 / g2.max())


# --------------------------------------------------------------------------
# Bad input, through the script (exit status, stderr, no traceback)
# --------------------------------------------------------------------------
def test_missing_and_empty_folder(tmp_path):
    proc = run_script([str(tmp_path / "nowhere")], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"clever.py: error: {tmp_path / 'nowhere'}: no such folder"]
    (tmp_path / "empty").mkdir()
    proc = run_script([str(tmp_path / "empty")], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no .mat files" in proc.stderr


def test_bad_files_are_named_and_the_rest_is_processed(tmp_path):
    data = tmp_path / "d"
    targeted_folder(str(data), n_images=1, niters=50)
    corrupt = data / common.MatName(1024, 50, 5, 0, 3, "top2", "relu", 1).filename()
    corrupt.write_bytes(b"this is not a MATLAB file" * 20)
    lacking = write_stage1(str(data), 6, 3, "top2", niters=50, drop=("Gi_max",))
    wrong_order = write_stage1(str(data), 7, 3, "top2", order=2, niters=50,
                               arrays={"H2_max": np.ones(50), "g_x0_grad_2_norm": 1.0})
    proc = run_script([str(data), "--nthreads", "2", "--method", "maxsamp"], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clever.py: error:")]
    assert len(errors) == 3
    assert any(str(corrupt) in e and "cannot read" in e for e in errors)
    assert any(lacking in e and "'Gi_max'" in e for e in errors)
    assert any(wrong_order in e and "order-2" in e for e in errors)
    stats = [STATS_L0_RE.match(line) for line in proc.stdout.splitlines()
             if line.startswith("[STATS]")]
    assert [m["info"] for m in stats] == ["least", "random", "top2"]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("[DEBUG]")]) == 9


def test_nan_arrays_and_margins_fail_their_file(tmp_path, capsys):
    data = tmp_path / "d"
    good = write_stage1(str(data), 0, 1, "top2", niters=40)
    all_nan = write_stage1(str(data), 1, 1, "top2", niters=40,
                           arrays={"G2_max": np.full(40, np.nan)})
    nan_margin = write_stage1(str(data), 2, 1, "top2", niters=40, g_x0=np.nan)
    vector_margin = write_stage1(str(data), 3, 1, "top2", niters=40,
                                 extra={"g_x0": np.ones(3)})
    status, lines, err = run_main([str(data), "--nthreads", "1", "--method", "maxsamp"],
                                  capsys)
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("clever.py: error:")]
    assert len(errors) == 3
    assert any(all_nan in e and "no finite values" in e for e in errors)
    assert any(nan_margin in e and "not finite" in e for e in errors)
    assert any(vector_margin in e and "'g_x0'" in e and "3 values" in e for e in errors)
    debug = [MAXSAMP_RE.match(line) for line in lines if line.startswith("[DEBUG]")]
    assert {m["id"] for m in debug} == {"0"} and good


def test_only_untargeted_files_without_flag_is_one_line(tmp_path):
    data = tmp_path / "d"
    write_stage1(str(data), 0, 2, "class2", niters=30)
    proc = run_script([str(data), "--nthreads", "1"], tmp_path)
    assert proc.returncode == 2 and "--untargeted" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stage2_never_imports_tensorflow(tmp_path):
    data = tmp_path / "d"
    write_stage1(str(data), 0, 1, "top2", niters=30)
    code = ("import sys, clever; clever.main(clever.parse_args([sys.argv[1], '--nthreads', '1',"
            " '--method', 'maxsamp'])); "
            "assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(data)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
