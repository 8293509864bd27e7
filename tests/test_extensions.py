"""GlobalSIP 2018 extensions on the trained digits models: BPDA, order 2, SLOPE."""
import numpy as np
import pytest

import clever
import collect_gradients
from common import Norm

NUM_IMAGES = 10


def _stage1(save, models_dir, extra):
    args = collect_gradients.parse_args(
        ["-d", "digits", "-m", "normal", "--models_dir", models_dir, "-n", str(NUM_IMAGES),
         "--targets", "top2", "-s", str(save), "-q", "--no_progress"] + extra)
    assert collect_gradients.main(args) == 0
    return save / "digits_normal"


def _mean_bound(folder, norm=Norm.L2, **options):
    result = clever.score_folder(str(folder), clever.Options(**options))
    assert not result.errors
    bounds = [result.reported(fs.scores[norm]) for fs in result.files]
    return float(np.mean(bounds)), result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, trained_digits):
    """No transformation, with SLOPE maxima, shared-memory sampler like the BPDA runs."""
    save = tmp_path_factory.mktemp("baseline")
    return _stage1(save, trained_digits.dir, ["-N", "128", "-i", "20", "--sampler", "shm",
                                              "--compute_slope"])


@pytest.mark.parametrize("transform", ["defend_reduce", "defend_jpeg"])
def test_bpda_scores_match_the_undefended_model(transform, baseline, trained_digits, tmp_path):
    """Input transformations add no intrinsic robustness (GlobalSIP 2018, section 3)."""
    folder = _stage1(tmp_path, trained_digits.dir, ["-N", "128", "-i", "20", "--transform",
                                                    transform])
    plain, res_plain = _mean_bound(baseline)
    defended, res_def = _mean_bound(folder)
    assert len(res_plain.files) >= 8 and len(res_def.files) >= 8
    assert 0 < defended and 0 < plain
    assert abs(defended - plain) / plain <= 0.30, (transform, plain, defended)


def test_slope_estimates_lipschitz_below_the_gradient_norm(baseline):
    """SLOPE underestimates the local Lipschitz constant, so its bounds are larger (Table 3)."""
    grad_bound, grad = _mean_bound(baseline, radius_cap=False)
    slope_bound, slope = _mean_bound(baseline, radius_cap=False, use_slope=True)
    assert slope_bound > grad_bound > 0
    for g, s in zip(grad.files, slope.files):
        assert s.scores[Norm.L2].key == "L2_max" and g.scores[Norm.L2].key == "G2_max"
        # No per-file order between the maxima: a slope is bounded by the gradient norm
        # somewhere on its segment, not at a sampled point (mean value theorem).
        assert np.all(np.isfinite(s.file.maxima[Norm.L2])) and s.file.maxima[Norm.L2].min() > 0


def test_order2_bounds_on_the_tanh_model_are_finite_and_positive(digits_tanh_dir, tmp_path):
    args = collect_gradients.parse_args(
        ["-d", "digits", "-m", "normal", "--activation", "tanh", "--models_dir", digits_tanh_dir,
         "-n", str(NUM_IMAGES), "--targets", "top2", "--order", "2", "-N", "16", "-i", "5",
         "--power_iters", "8", "-s", str(tmp_path), "-q", "--no_progress"])
    assert collect_gradients.main(args) == 0
    result = clever.score_folder(str(tmp_path / "digits_normal"), clever.Options())
    assert result.order == 2 and not result.errors
    assert len(result.files) >= 8
    for fs in result.files:
        assert set(fs.scores) == {Norm.L2}
        bound = fs.scores[Norm.L2].bound_uncapped
        assert np.isfinite(bound) and bound > 0
        # The curvature term only shrinks the first-order bound with the gradient at x0.
        assert bound <= fs.file.g_x0 / fs.file.grad_norm * (1 + 1e-9)
