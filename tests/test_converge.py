"""The --converge stopping rule (converge.py) on synthetic streams of batch maxima."""
import json

import numpy as np
import pytest
from scipy.stats import weibull_max

import converge
from common import ToolError
from converge import ConvergenceRule, make_stop_rule, simulate

from weibull_fit import fit_reverse_weibull

#: True right end points (Lipschitz constants) of the two synthetic columns.
LOCS = (2.0, 0.5)


def weibull_stream(n, seed=0, locs=LOCS, shape=4.0):
    """[n, 1, len(locs)] maxima drawn from reverse Weibulls with right end points ``locs``."""
    rng = np.random.default_rng(seed)
    cols = [weibull_max.rvs(shape, loc=a, scale=0.25 * a, size=n, random_state=rng) for a in locs]
    return np.stack(cols, axis=1)[:, None, :]


@pytest.mark.parametrize("noise_factor", [0.0, 1.0])
def test_stops_when_the_estimate_is_stable_and_matches_independent_fits(noise_factor):
    rule = ConvergenceRule(tol=0.01, min_iters=50, check_every=25, noise_factor=noise_factor)
    stream = weibull_stream(300, seed=3)
    used, checks = simulate(rule, stream)
    assert used < 300
    assert used >= rule.min_iters and used % rule.check_every == 0
    # The same decision computed here from stage 2's fit directly: the first check
    # whose estimates all moved by < 1% since the previous one (or, with the noise
    # criterion, by less than noise_factor x the gap between the fits of the even and
    # the odd batches, relative to the estimate), with p > 0.05.
    previous, expected = None, None
    for it in range(50, 301, 25):
        fits = [fit_reverse_weibull(stream[:it, 0, k]) for k in range(2)]
        est = np.array([f.estimate for f in fits])
        if previous is not None:
            change = np.abs(est / previous - 1)
            threshold = np.full(2, 0.01)
            if noise_factor and np.any(change >= 0.01):
                even = np.array([fit_reverse_weibull(stream[:it:2, 0, k]).estimate
                                 for k in range(2)])
                odd = np.array([fit_reverse_weibull(stream[1:it:2, 0, k]).estimate
                                for k in range(2)])
                threshold = np.maximum(threshold, noise_factor * np.abs(even - odd) / est)
            if np.all(change < threshold) and all(f.pval > 0.05 for f in fits):
                expected = it
                break
        previous = est
    assert used == expected
    last = checks[-1]
    assert last.stop and last.iteration == used
    bound = 0.01 if last.spread is None else np.maximum(0.01, noise_factor * last.spread)
    assert np.all(last.change < bound)             # tol (or the noise) respected
    assert np.all(last.pvalues > 0.05)
    # Stable is not exact: with shape 4 the fitted end point is within ~10% at 75-150 batches.
    np.testing.assert_allclose(last.estimates[0], LOCS, rtol=0.1)


def test_never_before_min_iters():
    # A constant stream (a linear model: every gradient the same) is stable at once.
    stream = np.full((400, 2, 3), 1.5)
    rule = ConvergenceRule(tol=0.01, min_iters=60, check_every=25)
    used, checks = simulate(rule, stream)
    # first check at 75 (first multiple of 25 >= 60), stop at the next one.
    assert [c.iteration for c in checks] == [75, 100]
    assert used == 100 == rule.earliest_stop()
    np.testing.assert_array_equal(checks[-1].estimates, 1.5)
    for it in range(1, 75):
        assert make_stop_rule(rule)(it, stream[:it]) == (False, None)


@pytest.mark.parametrize("noise_factor", [0.0, 1.0])
def test_drifting_maximum_runs_to_the_budget(noise_factor):
    # The maximum grows with the iteration (0.4% per batch, ~7% per check) far more than
    # its sampling noise: the estimate keeps moving by more than tol and than the spread.
    n_b = 200
    growth = 1.0 + 0.004 * np.arange(n_b)
    noise = weibull_max.rvs(4.0, loc=1.0, scale=0.02, size=n_b,
                            random_state=np.random.default_rng(1))
    stream = (noise * growth)[:, None, None]
    rule = ConvergenceRule(tol=0.01, noise_factor=noise_factor)
    used, checks = simulate(rule, stream)
    assert used == n_b
    assert [c.iteration for c in checks] == list(range(rule.first_check(), n_b + 1, 25))
    assert not any(c.stop for c in checks)
    if noise_factor:
        assert all(c.spread is not None and np.all(c.spread < c.change) for c in checks[1:])


def test_smaller_tolerance_never_stops_earlier():
    stream = weibull_stream(200, seed=5, locs=(1.0,))
    used = [simulate(ConvergenceRule(tol=t), stream)[0] for t in (0.05, 0.01, 0.002)]
    assert used == sorted(used)
    assert used[0] < 200


def test_two_stable_checks_in_a_row():
    stream = np.full((300, 1, 1), 0.7)
    used, checks = simulate(ConvergenceRule(tol=0.01, min_iters=50, stable_checks=2), stream)
    assert used == 100 and [c.stable for c in checks] == [False, True, True]
    # One unstable step between: the run of stable checks starts again.
    stream[75:100] = 0.9  # the maximum jumps at the check of 100 only
    used, checks = simulate(ConvergenceRule(tol=0.01, min_iters=50, stable_checks=2), stream)
    assert [c.stable for c in checks][:3] == [False, True, False]
    assert used > 100


def test_rejected_fit_does_not_stop():
    # Stable estimates but the K-S test is not passed (p-value must exceed min_pvalue).
    stream = weibull_stream(150, seed=2, locs=(1.0,))
    rule = ConvergenceRule(tol=0.5, min_pvalue=0.9999)
    used, checks = simulate(rule, stream)
    assert used == 150 and all(c.stable for c in checks[1:])
    assert ConvergenceRule(tol=0.5).earliest_stop() == simulate(ConvergenceRule(tol=0.5), stream)[0]


def test_stop_rule_records_are_json_and_provenance():
    stream = weibull_stream(100, seed=4)
    stop_rule = make_stop_rule(ConvergenceRule(tol=0.01, min_iters=50))
    stop, record = stop_rule(50, stream[:50])
    assert stop is False and record["iteration"] == 50 and record["change"] == [[None, None]]
    assert np.shape(record["estimates"]) == (1, 2) and np.shape(record["pvalues"]) == (1, 2)
    stop, record = stop_rule(75, stream[:75])
    assert np.all(np.array(record["change"]) >= 0)
    prov = converge.provenance(ConvergenceRule(tol=0.01), 75, 500, [record])
    assert prov["Niters_used"] == 75 and prov["converge_stopped"] == 1
    assert json.loads(prov["converge_rule"])["tol"] == 0.01
    assert json.loads(prov["converge_checks"])[0]["iteration"] == 75
    assert converge.provenance(None, 500, 500) == {"Niters_used": 500}


@pytest.mark.parametrize("kwargs, flag", [({"tol": 0.0}, "--converge"),
                                          ({"tol": float("nan")}, "--converge"),
                                          ({"tol": 0.01, "min_iters": 0}, "--min_iters"),
                                          ({"tol": 0.01, "check_every": 0}, "--check_every")])
def test_bad_parameters_name_the_flag(kwargs, flag):
    with pytest.raises(ToolError, match=flag):
        ConvergenceRule(**kwargs)


def test_relative_change():
    got = converge.relative_change([1.0, 0.0, 2.0, np.nan], [1.1, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(got, [0.1 / 1.1, 0.0, np.inf, np.inf])


def test_collect_gradients_converge_end_to_end(tmp_path, linear_model_path):
    """--converge on a linear model (constant maxima: exact estimates) stops at the second
    check (the first after --min_iters has nothing to compare with); the file keeps N_b
    in its name and records what ran."""
    import os
    import subprocess
    import sys

    import scipy.io

    from conftest import ROOT

    save = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "collect_gradients.py"),
                           "--model_path", linear_model_path, "-n", "1", "-N", "8", "-i", "60",
                           "--targets", "top2", "--converge", "0.01", "--min_iters", "10",
                           "--check_every", "5", "-s", str(save), "-q", "--no_progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((save / "digits_linear").glob("*.mat"))
    assert len(files) == 1 and files[0].name.startswith("8_60_")
    mat = scipy.io.loadmat(str(files[0]))
    assert mat["Niters_used"].item() == 15 and mat["G2_max"].size == 15
    assert mat["converge_stopped"].item() == 1
    checks = json.loads(str(mat["converge_checks"][0]))
    assert [c["iteration"] for c in checks] == [10, 15]
    assert json.loads(str(mat["converge_rule"][0]))["tol"] == 0.01
    # Stage 2 reads a file of any length; the summary shows the batches used.
    summary = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), str(save),
                           "--nthreads", "1", "--summary", str(summary)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(summary.read_text())["records"][0]
    assert record["niters"] == 60 and record["niters_used"] == 15


def wandering_stream(n, seed=0):
    """[n, 1, 1] maxima of a heavy tail (Pareto, no end point): the fitted location
    keeps moving by more than 1% per check, and two halves disagree by more still."""
    return 1.0 + np.random.default_rng(seed).pareto(5.0, size=(n, 1, 1))


def test_noise_criterion_stops_what_its_own_noise_cannot_resolve():
    stream = wandering_stream(300, seed=0)
    used_tol, _ = simulate(ConvergenceRule(tol=0.01, min_iters=50, noise_factor=0.0), stream)
    used, checks = simulate(ConvergenceRule(tol=0.01, min_iters=50, noise_factor=1.0), stream)
    assert used_tol == 300 and used < 300
    last = checks[-1]
    assert last.stop and last.spread is not None
    # It stopped because the move was below the half-run spread, not below tol.
    assert np.any(last.change >= 0.01) and np.all(last.change < last.spread)
    # Recompute that spread from stage 2's fits of the even and the odd batches.
    even = fit_reverse_weibull(stream[:used:2, 0, 0]).estimate
    odd = fit_reverse_weibull(stream[1:used:2, 0, 0]).estimate
    np.testing.assert_allclose(last.spread[0, 0], abs(even - odd) / last.estimates[0, 0])
    # A larger factor never stops later, and never before min_iters + one check.
    used_2x, _ = simulate(ConvergenceRule(tol=0.01, min_iters=50, noise_factor=2.0), stream)
    assert ConvergenceRule(tol=0.01, min_iters=50).earliest_stop() <= used_2x <= used
    assert json.loads(json.dumps(last.to_record()))["spread"] is not None


def test_halves_are_fitted_only_where_the_change_exceeds_tol():
    stream = np.full((200, 2, 3), 0.3)   # exact columns: no change, no spread needed
    used, checks = simulate(ConvergenceRule(tol=0.01, min_iters=50), stream)
    assert used == 75 and all(c.spread is None for c in checks)
    rule = ConvergenceRule(tol=0.01)
    np.testing.assert_array_equal(rule.spread_columns(stream[:75], np.full((2, 3), 0.3)), 0.0)


def test_bad_noise_factor_is_a_one_line_error():
    with pytest.raises(ToolError, match="--converge_noise"):
        ConvergenceRule(tol=0.01, noise_factor=-1.0)
