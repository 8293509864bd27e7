"""Intervals of CLEVER scores: where a rerun of stage 1 with another seed would put them.

Pure NumPy/SciPy (no TensorFlow, no printing). The method is in
docs/intervals.md. The default (:data:`SCHEME` "bootstrap", the one that
calibrated on bench/bench_interval.py) draws B = 10 streams of N_b maxima from
the fitted reverse Weibull, refits each (from the fitted shape) and takes
L +- t_{B-1}((1 + level) / 2) * sqrt(2) * sd(refits). The alternative
("subsets", measured and not kept), for one array S of N_b batch maxima and
its stage-2 fit with estimate L (a Lipschitz constant, or order 2's curvature):

1. the batches are split into K disjoint interleaved subsets (batches
   i, i + K, i + 2K, ...) and each is fitted by stage 2's method
   (:func:`subset_estimates`), from the full fit's shape only;
2. the estimate of a rerun with another seed differs from L by two sampling
   errors, each of standard deviation sd(full) = sd(subsets) * K^(-r), so the
   prediction interval at ``level`` is
   L +- t_{K-1}((1 + level) / 2) * sqrt(2) * K^(-r) * sd(subsets)
   (:func:`half_width`); r = 1/2 (:data:`RATE`), measured in
   docs/intervals.md;
3. the bound g(x0) / L (or the second-order root) is monotone in L, so the
   bound's interval is the bound at the two ends, radius cap included
   (:func:`bound_interval`).

The interval covers the sampling of stage 1 (the seed), not a bias common to
every seed (e.g. maxima that keep creeping up with N_b on ReLU networks).

:func:`bound_interval` is the call of the Python API; stage 2
(:mod:`stage2`) calls :func:`lipschitz_interval` and :func:`bound_ends`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import aggregate
from weibull_fit import FitResult, FitStatus, Method, Penalty, fit_reverse_weibull

#: Default nominal level of ``clever.py --interval``.
DEFAULT_LEVEL = 0.9

#: Default number K of disjoint interleaved subsets of the batches.
N_SUBSETS = 5

#: Exponent r of the subset-to-full law sd(N_b) = sd(N_b / K) * K^(-r).
RATE = 0.5

#: How the sampling spread is estimated: "subsets" (K interleaved subset fits
#: scaled by K^(-r)) or "bootstrap" (B parametric draws of N_b maxima from the
#: fitted reverse Weibull, refitted); docs/intervals.md says which calibrates.
SCHEME = "bootstrap"

#: Draws of the parametric bootstrap.
N_BOOTSTRAP = 10

#: Statuses whose estimate has no sampling spread to speak of (exact, or nothing).
_NO_SPREAD = (FitStatus.DEGENERATE, FitStatus.ALL_ZERO)


@dataclass(frozen=True)
class LipschitzInterval:
    """The interval of one fitted estimate, in the units of the maxima.

    ``lo`` <= ``estimate`` <= ``hi`` (NaN without an interval: too few
    batches or no finite estimate); ``lo`` is at least 0. ``half_width``:
    t * sqrt(2) * K^(-r) * sd(subsets); ``subsets``: the K subset estimates
    (empty when not fitted).
    """

    estimate: float
    lo: float
    hi: float
    half_width: float
    subsets: tuple[float, ...] = ()


def check_level(level: float) -> float:
    """``level`` as a float in [0, 1) (0: no interval); ValueError otherwise."""
    level = float(level)
    if not (0.0 <= level < 1.0):
        raise ValueError(f"the interval level must be in [0, 1) (0: none), not {level}")
    return level


def interleaved_subsets(n: int, k: int = N_SUBSETS) -> list[np.ndarray]:
    """Indices of the K disjoint interleaved subsets of n batches: i, i + k, i + 2k, ...

    Interleaved rather than contiguous so that each subset spans the whole run
    (a drift along the batches falls on every subset alike).
    """
    if k < 2:
        raise ValueError(f"need at least 2 subsets, not {k}")
    return [np.arange(i, n, k) for i in range(k)]


def subset_estimates(maxima: np.ndarray, k: int = N_SUBSETS,
                     method: Method | str = Method.MLE_REG, shape_reg: float = 0.01,
                     penalize: Penalty | str = Penalty.SCALE,
                     c_init: tuple[float, ...] | None = None) -> np.ndarray:
    """Stage 2's estimate of each of the K interleaved subsets of ``maxima`` [N_b].

    ``c_init``: initial shapes of the subset fits (None: weibull_fit's seven,
    as the full fit; stage 2 passes the full fit's shape alone, 7x cheaper).
    Returns [K] float64 (NaN where a subset has no finite value).
    """
    s = np.asarray(maxima).ravel()
    extra = {} if c_init is None else {"c_init": tuple(float(c) for c in c_init)}
    return np.array([fit_reverse_weibull(s[idx], method, shape_reg, penalize, **extra).estimate
                     for idx in interleaved_subsets(s.size, k)], np.float64)


def half_width(subsets: np.ndarray, level: float = DEFAULT_LEVEL, rate: float = RATE) -> float:
    """t_{m-1}((1 + level) / 2) * sqrt(2) * K^(-rate) * sd(subsets), m finite of K subsets.

    ``subsets``: [K] subset estimates. The sqrt(2): the interval is for the
    estimate of another run, which has its own sampling error. NaN with fewer
    than 2 finite subset estimates; 0 for ``level`` 0.
    """
    from scipy.stats import t as student_t

    level = check_level(level)
    v = np.asarray(subsets, np.float64)
    k = v.size
    v = v[np.isfinite(v)]
    if level == 0.0:
        return 0.0
    if v.size < 2:
        return math.nan
    sd = float(np.std(v, ddof=1))
    return float(student_t.ppf(0.5 * (1.0 + level), v.size - 1) * math.sqrt(2.0)
                 * k ** (-float(rate)) * sd)


def lipschitz_interval(maxima: np.ndarray, fit: FitResult, level: float = DEFAULT_LEVEL,
                       k: int = N_SUBSETS, method: Method | str = Method.MLE_REG,
                       shape_reg: float = 0.01, penalize: Penalty | str = Penalty.SCALE,
                       rate: float = RATE, warm_start: bool = True,
                       scheme: str | None = None) -> LipschitzInterval:
    """The interval of ``fit.estimate`` (stage 2's fit of ``maxima`` [N_b] with
    these ``method``, ``shape_reg`` and ``penalize``).

    Exact estimates (degenerate or all-zero maxima) get a zero-width interval;
    no finite estimate, or fewer than 2 batches per subset, gives NaN ends.
    ``warm_start``: subset fits start from the full fit's shape alone (when it
    was fitted), else from weibull_fit's seven shapes.
    """
    est = float(fit.estimate)
    level = check_level(level)
    s = np.asarray(maxima).ravel()
    s = s[np.isfinite(s)]
    if not math.isfinite(est) or fit.status is FitStatus.NO_DATA:
        return LipschitzInterval(est, math.nan, math.nan, math.nan)
    if level == 0.0 or fit.status in _NO_SPREAD:
        return LipschitzInterval(est, est, est, 0.0)
    if s.size < 2 * k:
        return LipschitzInterval(est, math.nan, math.nan, math.nan)
    scheme = SCHEME if scheme is None else scheme
    if scheme == "bootstrap":
        # B draws of the full N_b from the fitted model: the spread at N_b itself,
        # no subset-to-full law (k is unused). Without a fit (max(S) used): subsets.
        subsets = bootstrap_estimates(s, fit, N_BOOTSTRAP, method, shape_reg, penalize)
        if subsets.size:
            h = half_width(subsets, level, 0.0)
            if not math.isfinite(h):
                return LipschitzInterval(est, math.nan, math.nan, h, tuple(subsets))
            return LipschitzInterval(est, max(est - h, 0.0), est + h, h, tuple(subsets))
    elif scheme != "subsets":
        raise ValueError(f"scheme must be 'subsets' or 'bootstrap', not {scheme!r}")
    c_init = (fit.shape,) if warm_start and fit.status is FitStatus.FIT else None
    subsets = subset_estimates(s, k, method, shape_reg, penalize, c_init)
    h = half_width(subsets, level, rate)
    if not math.isfinite(h):
        return LipschitzInterval(est, math.nan, math.nan, h, tuple(subsets))
    return LipschitzInterval(est, max(est - h, 0.0), est + h, h, tuple(subsets))


def bound_ends(order: int, g_x0: float, l_lo: float, l_hi: float, cap: float | None,
               grad_norm: float | None = None) -> tuple[float, float]:
    """(lo, hi) of the bound for an estimate in [l_lo, l_hi], each capped at ``cap``.

    The bound g(x0) / L (order 1) or the second-order root in H (order 2) is
    monotone in the estimate, so its ends are the bounds at the estimate's
    ends (in either order: g(x0) < 0 reverses them). NaN ends stay NaN.
    """
    def bound(estimate: float) -> float:
        if math.isnan(estimate):
            return math.nan
        if order == 1:
            b = aggregate.clever_bound(g_x0, estimate)
        else:
            b = aggregate.second_order_bound(g_x0, grad_norm, estimate)
        return aggregate.capped(b, cap)

    a, b = bound(l_lo), bound(l_hi)
    if math.isnan(a) or math.isnan(b):
        return math.nan, math.nan
    return min(a, b), max(a, b)


def bound_interval(maxima: np.ndarray, g_x0: float, level: float = DEFAULT_LEVEL, *,
                   cap: float | None = None, order: int = 1, grad_norm: float | None = None,
                   fit: FitResult | None = None, method: Method | str = Method.MLE_REG,
                   shape_reg: float = 0.01, penalize: Penalty | str = Penalty.SCALE,
                   k: int = N_SUBSETS) -> tuple[float, float]:
    """The interval (lo, hi) of one CLEVER bound, for the Python API.

    ``maxima``: [N_b] float batch maxima of one (target, norm) column (the
    dual-norm gradient norms, e.g. a file's ``G2_max`` for the L2 bound; order
    2: the curvature maxima). ``g_x0``: the logit margin. ``cap``: the radius
    cap in the bound's norm (:func:`aggregate.cap_for`; None: uncapped).
    ``grad_norm``: ||grad g(x0)||_2 (order 2 only). ``fit``: the column's
    stage-2 fit if already made (else fitted here with ``method``,
    ``shape_reg``, ``penalize``). Returns the range in which a rerun of stage
    1 with another seed puts the bound with probability ``level``; the bound
    itself, min(g_x0 / L, cap), always lies in it. NaN ends when the column
    is too short (< 2 k batches) or has no finite value.
    """
    if fit is None:
        fit = fit_reverse_weibull(maxima, method, shape_reg, penalize)
    iv = lipschitz_interval(maxima, fit, level, k, method, shape_reg, penalize)
    return bound_ends(order, g_x0, iv.lo, iv.hi, cap, grad_norm)


# --------------------------------------------------------------------------
# Summaries: the interval of a mean or a minimum over files
# --------------------------------------------------------------------------
def summary_interval(values, lo, hi, how: str = "mean",
                     groups=None) -> tuple[float, float]:
    """The sampling interval of the mean or minimum of several files' bounds.

    ``values``, ``lo``, ``hi``: [n] bounds and their intervals (the same
    level); ``how``: "mean" or "min". ``groups``: [n] keys (image ids) of
    files whose samples are shared (stage 1 draws one image's points once
    for all its targets): their deviations add up within a group and in
    quadrature across groups (None: every file its own group).

    Mean: mean -+ sqrt(sum_g (sum_{i in g} d_i)^2) / n with d_i = b_i - lo_i
    below and hi_i - b_i above (independent files, normal errors: the half
    widths of one level add in quadrature). Minimum: (min lo, min hi).
    This is the uncertainty of the seed for these same files, not of the
    choice of images. NaN if any end is NaN.
    """
    b = np.asarray(values, np.float64)
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if b.size == 0:
        raise ValueError("nothing to summarise: no values")
    if np.isnan(b).any() or np.isnan(lo).any() or np.isnan(hi).any():
        return math.nan, math.nan
    if how == "min":
        return float(np.min(lo)), float(np.min(hi))
    if how != "mean":
        raise ValueError(f"how must be 'mean' or 'min', not {how!r}")
    keys = list(range(b.size)) if groups is None else list(groups)
    mean = float(aggregate.reduce(list(b)))

    def spread(d: np.ndarray) -> float:
        if np.isinf(d).any():
            return math.inf
        sums: dict = {}
        for key, v in zip(keys, d):
            sums[key] = sums.get(key, 0.0) + float(v)
        return math.sqrt(sum(v * v for v in sums.values())) / b.size

    with np.errstate(invalid="ignore"):
        down, up = spread(b - lo), spread(hi - b)
    return mean - down, mean + up


def describe(level: float) -> dict:
    """What an interval of the summaries is (JSON-ready), for ``--summary``."""
    return {"level": float(level), "method": f"parametric_bootstrap_{N_BOOTSTRAP}"
            if SCHEME == "bootstrap" else f"interleaved_subsets_{N_SUBSETS}_rate_{RATE:g}",
            "covers": "seed",
            "note": "the range in which stage 1 rerun with another seed puts each bound "
                    "(files) or summary (the same files); not the choice of images, not a "
                    "bias common to every seed (docs/intervals.md)"}


def bootstrap_estimates(maxima: np.ndarray, fit: FitResult, b: int = 10,
                        method: Method | str = Method.MLE_REG, shape_reg: float = 0.01,
                        penalize: Penalty | str = Penalty.SCALE) -> np.ndarray:
    """Parametric bootstrap: stage 2's estimate of ``b`` streams of N_b maxima drawn
    from the fitted reverse Weibull (the alternative measured in docs/intervals.md).

    The draws are seeded by the column's bytes, so stage 2 stays deterministic.
    Returns [b] float64 (empty without a fit).
    """
    import zlib

    from scipy.stats import weibull_min

    if fit.status is not FitStatus.FIT:
        return np.zeros(0)
    s = np.asarray(maxima, np.float64).ravel()
    s = s[np.isfinite(s)]
    rng = np.random.default_rng(zlib.crc32(s.tobytes()))
    out = []
    for _ in range(b):
        draw = -weibull_min.rvs(fit.shape, loc=fit.loc, scale=fit.scale, size=s.size,
                                random_state=rng)
        out.append(fit_reverse_weibull(draw, method, shape_reg, penalize,
                                       c_init=(fit.shape,)).estimate)
    return np.array(out, np.float64)
