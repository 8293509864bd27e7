"""Stage 2 against the original tool's clever.py on the same stage-1 files.

``tests/data/original-stage2/`` holds real stage-1 files of a digits CNN and
the original ``clever.py``'s complete output on them (its README says how they
were made). Every ``[DEBUG][L1]`` field, every ``[DEBUG][L2]`` line (at -v)
and every ``[STATS]`` line printed here must equal the original's, up to one
unit in the last printed digit: the Nelder-Mead fits depend a little on the
SciPy and BLAS build, and a value on a rounding edge prints either way.
"""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "data", "original-stage2")

#: (folder, original output, extra flags of both tools)
CASES = {
    "mle_reg": ("targeted", "original_targeted_mle_reg.txt", []),
    "mle": ("targeted", "original_targeted_mle.txt", ["--method", "mle"]),
    "maxsamp": ("targeted", "original_targeted_maxsamp.txt", ["--method", "maxsamp"]),
    "untargeted": ("untargeted", "original_untargeted_mle_reg.txt", ["--untargeted"]),
}

PAIR = re.compile(r"(\w+) = ([^,]+)")
#: a printed number (not the digit of a name such as clever_L2)
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf)")


def _fixture(*parts):
    path = os.path.join(FIXTURES, *parts)
    assert os.path.exists(path), f"{path}: missing from the repository's test data"
    return path


def _run_ours(folder, flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), _fixture(folder),
                           "--no_radius_cap", "--nthreads", "1", "-v", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def _lines(lines, prefix):
    return [line for line in lines if line.startswith(prefix)]


def _close_in_last_digit(ours: str, theirs: str) -> bool:
    """Equal as printed, or one unit apart in the last printed digit."""
    if ours == theirs:
        return True
    try:
        a, b = float(ours), float(theirs)
    except ValueError:
        return False
    if math.isnan(a) and math.isnan(b):
        return True
    mantissa = theirs.lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(theirs.lower().split("e")[1]) if "e" in theirs.lower() else 0
    unit = 10.0 ** (exponent - decimals)
    return abs(a - b) <= unit * 1.000001


def _assert_same_fields(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} lines here, {len(theirs)} in the original"
    for mine, orig in zip(ours, theirs):
        a, b = PAIR.findall(mine), PAIR.findall(orig)
        assert [k for k, _ in a] == [k for k, _ in b], f"{what}: fields differ:\n{mine}\n{orig}"
        for (key, va), (_, vb) in zip(a, b):
            assert _close_in_last_digit(va.strip(), vb.strip()), \
                f"{what}: {key} = {va} here, {vb} in the original:\n{mine}\n{orig}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_lines_equal_the_original(case):
    folder, original, flags = CASES[case]
    with open(_fixture(original)) as fh:
        theirs = fh.read().splitlines()
    ours = _run_ours(folder, flags)
    for prefix in ("[DEBUG][L1]", "[DEBUG][L2]", "[STATS]"):
        expected = _lines(theirs, prefix)
        assert expected or prefix == "[DEBUG][L2]", f"{original}: no {prefix} lines"
        _assert_same_fields(_lines(ours, prefix), expected, f"{case} {prefix}")
    # Apart from their numbers, the summaries are the original's text byte for byte.
    assert [NUMBER.sub("#", line) for line in _lines(ours, "[STATS]")] == \
        [NUMBER.sub("#", line) for line in _lines(theirs, "[STATS]")]


def test_fit_picks_the_first_best_start_and_maps_back():
    """The chosen fit is the first start with the best K-S p-value, in S's units."""
    import scipy.io

    from weibull_fit import FitStatus, fit_reverse_weibull

    mat = scipy.io.loadmat(_fixture("targeted", "256_50_13_0_5_top2_relu_order1.mat"))
    s = np.squeeze(mat["G2_max"])
    fit = fit_reverse_weibull(s)
    assert fit.status is FitStatus.FIT
    pvals = [t.pval for t in fit.trials]
    assert fit.pval == max(pvals) and fit.c_init == fit.trials[pvals.index(max(pvals))].c_init
    assert fit.estimate == -fit.loc and fit.estimate >= s.max()
    # The original's printed numbers for this file (bnd_norm 2 line of original_targeted_mle_reg.txt).
    assert _close_in_last_digit(f"{fit.shape:.5g}", "43.993")
    assert _close_in_last_digit(f"{fit.loc:.5g}", "-12.501")


def test_penalising_the_shape_is_an_option_that_changes_the_numbers():
    """--penalize shape (c^2) gives lower shapes than the original's default on real files."""
    import scipy.io

    from weibull_fit import fit_reverse_weibull

    mat = scipy.io.loadmat(_fixture("targeted", "256_50_13_0_5_top2_relu_order1.mat"))
    s = np.squeeze(mat["G2_max"])
    scale_pen = fit_reverse_weibull(s, penalize="scale")
    shape_pen = fit_reverse_weibull(s, penalize="shape")
    assert shape_pen.shape < scale_pen.shape
    assert shape_pen.estimate != scale_pen.estimate


def test_ill_conditioned_samples_fall_back_to_the_maximum():
    """Every start rejected by K-S: the estimate is max(S) and the fields print as -1."""
    from weibull_fit import FitStatus, fit_reverse_weibull

    # Two clusters far apart: no reverse Weibull fits them (p-values ~ 0).
    s = np.concatenate([np.full(40, 1.0) + np.linspace(0, 1e-3, 40), np.full(40, 9.0),
                        [9.5, 9.6]])
    fit = fit_reverse_weibull(s)
    assert fit.status is FitStatus.ILL_CONDITIONED
    assert fit.estimate == 9.6 and fit.loc == -9.6
    assert (fit.shape, fit.scale, fit.ks, fit.pval) == (-1.0, -1.0, -1.0, -1.0)


def test_untargeted_takes_every_file_of_an_image(tmp_path):
    """run.sh's ``all`` writes top2/random/least files: --untargeted takes their minimum."""
    import shutil

    for name in os.listdir(_fixture("targeted")):
        shutil.copy(_fixture("targeted", name), tmp_path / name)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), str(tmp_path),
                           "--untargeted", "--no_radius_cap", "--nthreads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    debug = [dict(PAIR.findall(line)) for line in _lines(proc.stdout.splitlines(), "[DEBUG][L1]")]
    per_image = {}
    for d in debug:
        if d["bnd_norm"] == "2":
            per_image.setdefault(int(d["id"]), []).append(float(d["bnd"]))
    stats = [dict(PAIR.findall(line)) for line in _lines(proc.stdout.splitlines(), "[STATS][L1]")]
    assert [int(s["image"]) for s in stats] == sorted(per_image)
    for s in stats:
        bounds = per_image[int(s["image"])]
        assert int(s["n_classes"]) == len(bounds) + 1
        assert float(s["clever_L2"]) == pytest.approx(min(bounds), rel=1e-4)
    overall = dict(PAIR.findall(_lines(proc.stdout.splitlines(), "[STATS][L0]")[0]))
    assert float(overall["untargeted_clever_L2"]) == pytest.approx(
        np.mean([float(s["clever_L2"]) for s in stats]), rel=1e-4)


def test_match_reads_only_the_matching_files(tmp_path):
    import shutil

    for name in os.listdir(_fixture("targeted")):
        shutil.copy(_fixture("targeted", name), tmp_path / name)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), str(tmp_path),
                           "--match", "256_50_12_*.mat", "--method", "maxsamp", "--nthreads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = {dict(PAIR.findall(line))["id"]
           for line in _lines(proc.stdout.splitlines(), "[DEBUG][L1]")}
    assert ids == {"12"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py"), str(tmp_path),
                           "--match", "1024_*.mat"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--match" in proc.stderr and "Traceback" not in proc.stderr
