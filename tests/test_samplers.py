"""The ball samplers, tested by the laws they must follow.

Both samplers (NumPy ``randsphere.BallSampler.draw`` and the in-graph
``estimate_gradient_norm.tf_draw``), every norm and both schemes (the
original's, a direction times a scale uniform in [0, R], and
``uniform_ball=True``) must

* stay inside the ball of radius R in their norm;
* give the radius its exact law. With s = ||x|| / R in the sampler's norm and
  d coordinates:

  ======================  ==========================  =======================
  norm, scheme            how a point is made          law of s
  ======================  ==========================  =======================
  li (either scheme)      d uniforms in [-R, R]        s^d ~ U(0, 1)
  l2, original            U^(1/d) V z, V ~ U(0, R)     P(s <= t) = (d t - t^d) / (d - 1)
  l2, uniform_ball        R U^(1/d) z                  s^d ~ U(0, 1)
  l1, original            spacings (sum 1) times V     s ~ U(0, 1)
  l1, uniform_ball        first d of Dirichlet(1^d+1)  s ~ Beta(d, 1): s^d ~ U(0, 1)
  ======================  ==========================  =======================

  (z uniform on the unit L2 sphere, U and V independent uniforms; for l2
  original, P(U^(1/d) V' <= t) = integral over v of min(1, (t/v)^d));
* give the direction its law: x_1^2 / ||x||_2^2 ~ Beta(1/2, (d-1)/2) for l2
  (z uniform on the sphere), |x_1| / ||x||_1 ~ Beta(1, d-1) for l1 (a
  coordinate of a flat Dirichlet in d parts), x_1 / R ~ U(-1, 1) for li;
* give every coordinate's sign a fair coin (a binomial test per coordinate);
* and the two samplers must agree in distribution (two-sample K-S tests of the
  radius and of a coordinate on many points).

Seeds are fixed, so every p-value is the same on every run; the thresholds are
Bonferroni-style (P_MIN over the number of tests of a kind), far below the
p-values a correct sampler gets, so no test flakes, while a broken sampler
(say every sign positive) gets p-values like 1e-1000.
"""
import numpy as np
import pytest
from scipy import stats

from randsphere import BallSampler

NORMS = ("l1", "l2", "li")
SCHEMES = (False, True)               # uniform_ball
SAMPLERS = ("numpy", "tf")
DIMS = (3, 40)
N = 20000                             # points per draw
RADIUS = {"l1": 2.5, "l2": 0.7, "li": 0.1}
#: family-wise level: each kind of test divides it by the number of tests of that kind
P_MIN = 1e-6
CASES = [(norm, uniform, sampler, d) for norm in NORMS for uniform in SCHEMES
         for sampler in SAMPLERS for d in DIMS]
ALPHA = P_MIN / len(CASES)
SEEDS = {"numpy": 20240, "tf": 20241}


def _ids(case):
    norm, uniform, sampler, d = case
    return f"{norm}-{'uniform' if uniform else 'original'}-{sampler}-d{d}"


_cache = {}


def draw(norm, uniform, sampler, d, n=N, seed=None):
    """n points [n, d] float64 from one sampler, with a fixed seed per (case, sampler)."""
    seed = SEEDS[sampler] + 97 * d + 7 * NORMS.index(norm) + uniform if seed is None else seed
    key = (norm, uniform, sampler, d, n, seed)
    if key not in _cache:
        ball = BallSampler.create(norm, RADIUS[norm], uniform)
        if sampler == "numpy":
            out = ball.draw(np.random.default_rng(seed), n, d)
        else:
            import tensorflow as tf

            from estimate_gradient_norm import tf_draw, tf_seed

            out = tf_draw(ball, tf.constant(tf_seed(seed, d), tf.int64), n, d).numpy()
        assert out.shape == (n, d) and out.dtype == np.float32
        _cache[key] = out.astype(np.float64)
    return _cache[key]


def norm_of(x, norm):
    return {"l1": np.abs(x).sum(1), "l2": np.sqrt((x ** 2).sum(1)),
            "li": np.abs(x).max(1)}[norm]


def radius_cdf(norm, uniform, d):
    """The CDF of s = ||x|| / R (table in the module docstring)."""
    if norm == "l2" and not uniform:
        return lambda t: (d * np.clip(t, 0, 1) - np.clip(t, 0, 1) ** d) / (d - 1)
    if norm == "l1" and not uniform:
        return lambda t: np.clip(t, 0, 1)
    return lambda t: np.clip(t, 0, 1) ** d


def direction_sample_and_cdf(x, norm, d):
    """A statistic of the first coordinate whose law does not depend on the radius."""
    if norm == "l2":
        return x[:, 0] ** 2 / (x ** 2).sum(1), stats.beta(0.5, (d - 1) / 2).cdf
    if norm == "l1":
        return np.abs(x[:, 0]) / np.abs(x).sum(1), stats.beta(1, d - 1).cdf
    return x[:, 0] / RADIUS["li"], stats.uniform(-1, 2).cdf


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_point_is_inside_the_ball(case):
    norm, uniform, sampler, d = case
    x = draw(*case)
    r = norm_of(x, norm)
    # float32 points: rounded coordinates may pass R by a few ulps (measured: 4e-8)
    assert r.max() <= RADIUS[norm] * (1 + 1e-6)
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_radius_follows_its_law(case):
    norm, uniform, sampler, d = case
    s = norm_of(draw(*case), norm) / RADIUS[norm]
    res = stats.kstest(s, radius_cdf(norm, uniform, d))
    assert res.pvalue > ALPHA, f"K-S D = {res.statistic:.4g}, p = {res.pvalue:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_direction_follows_its_law(case):
    norm, uniform, sampler, d = case
    sample, cdf = direction_sample_and_cdf(draw(*case), norm, d)
    res = stats.kstest(sample, cdf)
    assert res.pvalue > ALPHA, f"K-S D = {res.statistic:.4g}, p = {res.pvalue:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_coordinate_has_a_fair_sign(case):
    norm, uniform, sampler, d = case
    x = draw(*case)
    # float32 spacings of sorted uniforms tie now and then: a coordinate exactly 0
    # has no sign, and is left out (rare: under 1e-3 of them)
    nonzero = (x != 0).sum(0)
    assert nonzero.min() > N * (1 - 1e-3)
    positive = (x > 0).sum(0)
    pvalues = np.array([stats.binomtest(int(k), int(n), 0.5).pvalue
                        for k, n in zip(positive, nonzero)])
    worst = int(pvalues.argmin())
    assert pvalues[worst] > ALPHA / d, (f"coordinate {worst}: {positive[worst]} of "
                                        f"{nonzero[worst]} positive, p = {pvalues[worst]:.3g}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("uniform", SCHEMES, ids=("original", "uniform"))
@pytest.mark.parametrize("d", DIMS)
def test_the_in_graph_sampler_agrees_with_numpy(norm, uniform, d):
    """Two-sample K-S tests of the radius and of the first two coordinates."""
    a, b = draw(norm, uniform, "numpy", d), draw(norm, uniform, "tf", d)
    alpha = P_MIN / (len(NORMS) * len(SCHEMES) * len(DIMS) * 3)
    for what, fa, fb in (("radius", norm_of(a, norm), norm_of(b, norm)),
                         ("x_1", a[:, 0], b[:, 0]), ("x_2", a[:, 1], b[:, 1])):
        res = stats.ks_2samp(fa, fb)
        assert res.pvalue > alpha, f"{what}: D = {res.statistic:.4g}, p = {res.pvalue:.3g}"


def test_the_tests_see_a_sampler_that_keeps_every_sign_positive():
    """The sign test rejects |x| (every sign positive) and the K-S test a wrong radius law."""
    x = np.abs(draw("l1", False, "numpy", 3))
    positive = (x > 0).sum(0)
    assert all(stats.binomtest(int(k), N, 0.5).pvalue < 1e-100 for k in positive)
    # the l2 original scheme's radius judged by the uniform ball's law
    s = norm_of(draw("l2", False, "numpy", 3), "l2") / RADIUS["l2"]
    assert stats.kstest(s, radius_cdf("l2", True, 3)).pvalue < 1e-100


def test_draws_are_reproducible_from_their_seed():
    for sampler in SAMPLERS:
        a = draw("l1", True, sampler, 3, n=50, seed=5)
        _cache.clear()
        b = draw("l1", True, sampler, 3, n=50, seed=5)
        c = draw("l1", True, sampler, 3, n=50, seed=6)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
