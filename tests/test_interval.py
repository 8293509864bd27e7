"""interval.py and --interval: calibration on synthetic maxima from a known reverse
Weibull, an interval never excludes its own estimate, summaries, and that
--interval 0 changes nothing (records and printed lines as without the feature)."""
import concurrent.futures
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import interval
import stage2
from weibull_fit import FitStatus, fit_reverse_weibull

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "original-stage2", "targeted")

#: The synthetic streams: batch maxima whose negatives follow weibull_min(c, -L, scale),
#: i.e. a reverse Weibull with right end point L; c = 6 is typical of the fitted shapes
#: of real files (4 to 40 on tests/data/original-stage2).
SHAPE, END, SCALE, N_B = 6.0, 10.0, 2.0, 200


def _stream(seed: int) -> np.ndarray:
    from scipy.stats import weibull_min

    rng = np.random.default_rng(seed)
    return -weibull_min.rvs(SHAPE, loc=-END, scale=SCALE, size=N_B, random_state=rng)


def _estimate_and_interval(seed: int) -> tuple[float, float, float]:
    s = _stream(seed)
    fit = fit_reverse_weibull(s)
    iv = interval.lipschitz_interval(s, fit, 0.9)
    return fit.estimate, iv.lo, iv.hi


@pytest.fixture(scope="module")
def synthetic_runs():
    """(estimate, lo, hi) of 400 independent streams (200 pairs), fitted on a pool."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return np.array(list(pool.map(_estimate_and_interval, range(400), chunksize=10)))


@pytest.mark.xfail(strict=True, reason="issue 25 open: the bootstrap interval covers the "
                   "other stream's estimate in 0.82 of 200 pairs (c = 6, N_b 200), below 0.85")
def test_interval_of_one_stream_covers_the_other_streams_estimate(synthetic_runs):
    a, b = synthetic_runs[0::2], synthetic_runs[1::2]
    covered = (a[:, 1] <= b[:, 0]) & (b[:, 0] <= a[:, 2])
    reverse = (b[:, 1] <= a[:, 0]) & (a[:, 0] <= b[:, 2])
    assert 0.85 <= covered.mean() <= 0.95, covered.mean()
    assert 0.85 <= reverse.mean() <= 0.95, reverse.mean()


def test_interval_never_excludes_its_own_estimate(synthetic_runs):
    est, lo, hi = synthetic_runs.T
    assert np.all(np.isfinite(lo)) and np.all(lo <= est) and np.all(est <= hi)
    assert np.all(hi > lo)


def test_a_wider_level_gives_a_wider_interval():
    s = _stream(7)
    fit = fit_reverse_weibull(s)
    i80, i90, i99 = (interval.lipschitz_interval(s, fit, lv) for lv in (0.8, 0.9, 0.99))
    assert i80.subsets == i90.subsets == i99.subsets
    assert i80.half_width < i90.half_width < i99.half_width


def test_half_width_is_the_t_prediction_interval_of_the_subsets():
    from scipy.stats import t

    subsets = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = t.ppf(0.95, 4) * math.sqrt(2) * 5 ** -0.5 * np.std(subsets, ddof=1)
    assert interval.half_width(subsets, 0.9) == pytest.approx(expected, rel=1e-12)
    # A subset without an estimate leaves 4 of 5 (t with 3 degrees of freedom, K still 5).
    with_nan = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    expected = t.ppf(0.95, 3) * math.sqrt(2) * 5 ** -0.5 * np.std(with_nan[:4], ddof=1)
    assert interval.half_width(with_nan, 0.9) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(interval.half_width(np.array([1.0, np.nan, np.nan]), 0.9))


def test_subsets_are_disjoint_interleaved_and_cover_every_batch():
    parts = interval.interleaved_subsets(23, 5)
    assert [list(p[:3]) for p in parts] == [[0, 5, 10], [1, 6, 11], [2, 7, 12], [3, 8, 13],
                                            [4, 9, 14]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))


def test_exact_and_empty_columns():
    flat = np.full(100, 3.0)          # a linear model: every maximum equal, exact
    fit = fit_reverse_weibull(flat)
    assert fit.status is FitStatus.DEGENERATE
    iv = interval.lipschitz_interval(flat, fit, 0.9)
    assert (iv.lo, iv.estimate, iv.hi) == (3.0, 3.0, 3.0)
    short = _stream(1)[:8]            # fewer than 2 batches per subset
    iv = interval.lipschitz_interval(short, fit_reverse_weibull(short), 0.9)
    assert math.isnan(iv.lo) and math.isnan(iv.hi)
    with pytest.raises(ValueError, match="level"):
        interval.check_level(1.0)


def test_bound_interval_is_the_bound_at_the_ends_and_is_capped():
    s = _stream(3)
    fit = fit_reverse_weibull(s)
    iv = interval.lipschitz_interval(s, fit, 0.9)
    lo, hi = interval.bound_interval(s, 2.0, 0.9, fit=fit)
    assert lo == pytest.approx(2.0 / iv.hi) and hi == pytest.approx(2.0 / iv.lo)
    assert lo <= 2.0 / fit.estimate <= hi
    # A cap between the ends caps the upper end only; one below both pins both.
    mid = 2.0 / fit.estimate
    lo_c, hi_c = interval.bound_interval(s, 2.0, 0.9, fit=fit, cap=mid)
    assert (lo_c, hi_c) == (pytest.approx(lo), mid)
    assert interval.bound_interval(s, 2.0, 0.9, fit=fit, cap=lo / 2) == (lo / 2, lo / 2)
    # g(x0) < 0 (a misclassified point) reverses the ends.
    nlo, nhi = interval.bound_interval(s, -2.0, 0.9, fit=fit)
    assert (nlo, nhi) == (pytest.approx(-hi), pytest.approx(-lo))


def test_summary_interval_of_a_mean_and_a_minimum():
    b, lo, hi = [1.0, 2.0, 3.0], [0.7, 1.6, 3.0], [1.4, 2.3, 3.0]
    # Independent files: half widths add in quadrature.
    mlo, mhi = interval.summary_interval(b, lo, hi, "mean")
    assert mlo == pytest.approx(2.0 - math.hypot(0.3, 0.4) / 3)
    assert mhi == pytest.approx(2.0 + math.hypot(0.4, 0.3) / 3)
    # Files of one image share samples: linearly within it.
    glo, _ = interval.summary_interval(b, lo, hi, "mean", groups=[0, 0, 1])
    assert glo == pytest.approx(2.0 - 0.7 / 3)
    assert interval.summary_interval(b, lo, hi, "min") == (0.7, 1.4)
    nan = interval.summary_interval(b, [0.7, math.nan, 3.0], hi, "mean")
    assert all(math.isnan(v) for v in nan)


# --------------------------------------------------------------------------
# Stage 2 and clever.py
# --------------------------------------------------------------------------
def _clever(*flags, folder=FIXTURE):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), folder,
                           "--nthreads", "1", *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """clever.py -v --summary on the original tool's files with --interval 0 and 0.9."""
    tmp = tmp_path_factory.mktemp("interval")
    out = {}
    for level in ("0", "0.9"):
        path = str(tmp / f"run{level}.json")
        proc = _clever("-v", "--interval", level, "--summary", path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(path) as fh:
            summary = json.load(fh)
        with open(path[:-5] + ".csv") as fh:
            csv_text = fh.read()
        out[level] = (proc.stdout.splitlines(), summary, csv_text)
    return out


def test_interval_zero_changes_nothing(runs):
    lines0, summary0, csv0 = runs["0"]
    lines9, summary9, csv9 = runs["0.9"]
    assert not [line for line in lines0 if line.startswith("[INTERVAL]")]
    # The original's lines are the same with and without the interval.
    assert lines0 == [line for line in lines9 if not line.startswith("[INTERVAL]")]
    # The records of --interval 0 have exactly the fields they had before it existed.
    rec = summary0["records"][0]["norms"]["L2"]
    assert set(rec) == set(stage2._NORM_FIELDS)
    assert set(summary0["aggregates"][0]) == {"level", "info", "clever_L1", "clever_L2",
                                              "clever_Li"}
    assert "interval" not in summary0 and "interval" not in summary0["options"]
    assert "_bound_lo" not in csv0 and "estimate_hi" not in csv0
    # The interval adds fields beside the same values.
    for r0, r9 in zip(summary0["records"], summary9["records"]):
        for norm, n0 in r0["norms"].items():
            n9 = r9["norms"][norm]
            assert {k: n9[k] for k in n0} == n0
    header = csv9.splitlines()[0].split(",")
    assert {"L1_bound_lo", "L1_bound_hi", "L2_bound_lo", "Li_bound_hi"} <= set(header)


def test_every_bound_lies_in_its_interval(runs):
    lines, summary, _ = runs["0.9"]
    assert summary["interval"]["covers"] == "seed"
    for r in summary["records"]:
        for n in r["norms"].values():
            assert n["bound_lo"] <= n["bound"] <= n["bound_hi"]
            assert n["bound_uncapped_lo"] <= n["bound_uncapped"] <= n["bound_uncapped_hi"]
            assert n["estimate_lo"] <= n["estimate"] <= n["estimate_hi"]
            assert n["bound_hi"] <= n["cap"]
    for agg in summary["aggregates"]:
        for norm in ("L1", "L2", "Li"):
            assert agg[f"clever_{norm}_lo"] <= agg[f"clever_{norm}"] <= agg[f"clever_{norm}_hi"]
    file_lines = [line for line in lines if line.startswith("[INTERVAL][FILE]")]
    assert len(file_lines) == 3 * len(summary["records"])
    assert len([line for line in lines if line.startswith("[INTERVAL][L0]")]) == 3


def test_bad_interval_level_is_one_line_error():
    proc = _clever("--interval", "1.5")
    assert proc.returncode != 0
    assert "--interval" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------
# The sweep's stage 2 and summaries; the figure
# --------------------------------------------------------------------------
def test_sweep_stage2_file_adds_the_interval_only_when_asked():
    import sweep_worker

    path = os.path.join(FIXTURE, sorted(os.listdir(FIXTURE))[0])
    with open(path, "rb") as fh:
        data = fh.read()
    plain = sweep_worker.stage2_file(path, data, "mle_reg", 0.01)
    with_iv = sweep_worker.stage2_file(path, data, "mle_reg", 0.01, 0.9)
    for label, n in plain["norms"].items():
        assert "bound_lo" not in n
        m = with_iv["norms"][label]
        assert {k: m[k] for k in n} == n
        assert m["bound_lo"] <= m["bound"] <= m["bound_hi"]
        assert m["estimate_lo"] <= m["estimate"] <= m["estimate_hi"]


def _sweep_record(img, info, l2, half):
    norms = {}
    for label, v in (("L1", 10 * l2), ("L2", l2), ("Li", l2 / 10)):
        h = half * v
        norms[label] = {"bound": v, "bound_uncapped": v, "pval": 0.5, "status": "fit",
                        "bound_lo": v - h, "bound_hi": v + h, "bound_uncapped_lo": v - h,
                        "bound_uncapped_hi": v + h}
    return {"job": "j", "model": "m", "dataset": "digits", "id": img, "info": info,
            "target_label": 1, "norms": norms}


def test_sweep_summary_rows_carry_the_interval(tmp_path):
    import sweep_summary

    recs = [_sweep_record(0, "top2", 0.4, 0.1), _sweep_record(1, "top2", 0.6, 0.2),
            _sweep_record(0, "least", 0.9, 0.1), _sweep_record(1, "least", 0.8, 0.1)]
    rows = sweep_summary.summarize(recs)
    top2 = [r for r in rows if r["info"] == "top2" and r["norm"] == "L2"][0]
    assert top2["mean_clever_lo"] == pytest.approx(0.5 - math.hypot(0.04, 0.12) / 2)
    assert top2["mean_clever_hi"] == pytest.approx(0.5 + math.hypot(0.04, 0.12) / 2)
    assert (top2["min_clever_lo"], top2["min_clever_hi"]) == pytest.approx((0.36, 0.44))
    both = [r for r in rows if r["info"] == "min_over_targets" and r["norm"] == "L2"][0]
    # image 0: min(0.4 [0.36, 0.44], 0.9 [...]); image 1: 0.6 [0.48, 0.72]
    assert both["mean_clever_lo"] == pytest.approx(0.5 - math.hypot(0.04, 0.12) / 2)
    sweep_summary.write_outputs(str(tmp_path), rows, recs, {})
    header = open(tmp_path / "summary.csv").read().splitlines()[0].split(",")
    assert header[:13] == list(sweep_summary._SUMMARY_COLUMNS)
    assert "mean_clever_lo" in header and "min_clever_uncapped_hi" in header
    # Without the interval, the columns of before.
    plain = [dict(r, norms={k: {f: v for f, v in n.items() if not f.endswith(("_lo", "_hi"))}
                            for k, n in r["norms"].items()}) for r in recs]
    sweep_summary.write_outputs(str(tmp_path / "plain"), sweep_summary.summarize(plain),
                                plain, {})
    header = open(tmp_path / "plain" / "summary.csv").read().splitlines()[0].split(",")
    assert header == list(sweep_summary._SUMMARY_COLUMNS)


def test_summary_figure_draws_error_bars(tmp_path):
    result = stage2.score_folder(FIXTURE, stage2.Options(interval=0.9))
    import stage2_plots

    path = str(tmp_path / "summary.png")
    stage2_plots.plot_summary(result, path)
    assert os.path.getsize(path) > 0
