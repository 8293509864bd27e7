"""Stage 1 then stage 2 on a linear classifier, whose CLEVER bounds are exact.

For g(x) = (w_c - w_j) . x + b, the gradient is constant, every batch
maximum equals ||w_c - w_j||_q, the reverse Weibull fit degenerates to that
value, and the bound in norm p is g(x0) / ||w_c - w_j||_q with q dual to p:
the exact minimum distortion (when the data range does not interfere).
"""
import re

import numpy as np
import pytest

import clever
import collect_gradients
from common import Norm, radius_cap


def _stage1(tmp_path, model_path, extra):
    args = collect_gradients.parse_args(
        ["--model_path", model_path, "-N", "64", "-i", "5", "-n", "6", "-s", str(tmp_path),
         "-q", "--no_progress"] + extra)
    assert collect_gradients.main(args) == 0
    return tmp_path / "digits_linear"


#: The gradient norm whose maximum bounds each bound norm (1/p + 1/q = 1), written out
#: here rather than taken from common.dual_norm, which the test must be able to catch.
DUAL_ORD = {Norm.L1: np.inf, Norm.L2: 2, Norm.LINF: 1}


def _exact(w, c, j, norm):
    diff = w[:, c].astype(np.float64) - w[:, j]
    return np.linalg.norm(diff, DUAL_ORD[norm])


@pytest.mark.parametrize("sampler", ["tf", "shm"])
def test_targeted_bounds_equal_the_exact_minimum_distortion(tmp_path, linear_model_path,
                                                            linear_weights, sampler):
    w, _ = linear_weights
    folder = _stage1(tmp_path, linear_model_path, ["--sampler", sampler])
    result = clever.score_folder(str(folder), clever.Options(nthreads=1))
    assert len(result.files) >= 12 and not result.errors
    for fs in result.files:
        f = fs.file
        for norm in (Norm.L1, Norm.L2, Norm.LINF):
            score = fs.scores[norm]
            exact = f.g_x0 / _exact(w, f.true_label, f.target_label, norm)
            np.testing.assert_allclose(score.bound_uncapped, exact, rtol=1e-5)
            cap = radius_cap(3.0, Norm.L2, norm, 784)
            np.testing.assert_allclose(score.cap, cap, rtol=1e-12)
            assert score.bound == pytest.approx(min(exact, cap), rel=1e-5)
    # The printed summary is the mean of the per-file bounds.
    for agg in result.aggregates:
        mine = [fs for fs in result.files if fs.file.info == agg.info]
        for norm, value in agg.values.items():
            np.testing.assert_allclose(value, np.mean([fs.scores[norm].bound for fs in mine]),
                                       rtol=1e-12)


def test_untargeted_bound_is_the_minimum_over_classes(tmp_path, linear_model_path, linear_weights,
                                                     capsys):
    w, b = linear_weights
    folder = _stage1(tmp_path, linear_model_path, ["--targets", "all"])
    capsys.readouterr()
    assert clever.main(clever.parse_args([str(folder), "--untargeted", "--nthreads", "1",
                                          "--no_radius_cap"])) == 0
    out = capsys.readouterr().out.splitlines()
    per_image = [line for line in out if line.startswith("[STATS][L1] image")]
    assert per_image
    import models

    data = models.load_dataset("digits")
    l2_values = []
    for line in per_image:
        m = re.match(r"\[STATS\]\[L1\] image = +(\d+), n_classes = +(\d+), clever_L1 = (\S+), "
                     r"clever_L2 = (\S+), clever_Li = (\S+)$", line)
        assert m, line
        i = int(m.group(1))
        logits = data.test_data[i].reshape(-1) @ w + b
        c = int(np.argmax(logits))
        for group, norm in ((3, Norm.L1), (4, Norm.L2), (5, Norm.LINF)):
            exact = min((logits[c] - logits[j]) / _exact(w, c, j, norm) for j in range(10) if j != c)
            # printed with 5 significant digits
            np.testing.assert_allclose(float(m.group(group)), exact, rtol=1e-4)
        l2_values.append(float(m.group(4)))
    overall = [line for line in out if line.startswith("[STATS][L0] info = untargeted")]
    assert len(overall) == 1
    got = float(re.search(r"untargeted_clever_L2 = (\S+),", overall[0]).group(1))
    np.testing.assert_allclose(got, np.mean(l2_values), rtol=1e-4)
