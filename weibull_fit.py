"""The reverse Weibull fit of CLEVER's stage 2 (docs/format.md), NumPy/SciPy only.

One array S of N batch maxima of a gradient norm in, one :class:`FitResult`
out. The default reproduces the original tool's ``clever.py`` number for
number: SciPy's ``weibull_min.fit`` of the rescaled maxima from seven initial
shapes, each optimised by Nelder-Mead (``scipy.optimize.fmin`` with its
default tolerances) on the negative log-likelihood plus ``shape_reg *
theta[2]**2``, the best Kolmogorov-Smirnov p-value kept, max(S) used when no
fit passes.

``theta`` is in SciPy's (c, loc, scale) order, so the original's penalty
falls on the SCALE of the rescaled fit, although its comment calls it the
shape. That is what produced the original's and the paper's numbers, hence
the default ``penalize="scale"``; ``penalize="shape"`` puts the penalty on c,
which lowers fitted shapes and Lipschitz estimates on real files (README,
"Differences from the original tool").

Stage 1 imports this module to stop sampling once estimates converge, and
stage 2 (``clever.py``) to score files; neither needs TensorFlow here.
"""
from __future__ import annotations

import enum
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("clever.fit")

#: Initial shapes c0 of the searches, in the original's order.
C_INIT: tuple[float, ...] = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)

#: Below this best K-S p-value the samples are ill-conditioned (max(S) is used).
MIN_PVALUE = 1e-3

#: Maxima whose spread is below this fraction of their maximum are one value
#: with float32 rounding noise (a linear model gives such arrays): the original
#: divides by a zero range there and falls back to max(S) after NaN fits; this
#: returns the same max(S) without the NaN detour.
DEGENERATE_RTOL = 1e-6


class Method(enum.Enum):
    """How the Lipschitz constant is estimated from the batch maxima (``--method``)."""

    MLE = "mle"
    MLE_REG = "mle_reg"
    MAXSAMP = "maxsamp"


class Penalty(enum.Enum):
    """Which parameter ``mle_reg`` penalises with ``shape_reg * value**2`` (``--penalize``)."""

    SCALE = "scale"  # theta[2] of SciPy's (c, loc, scale): the original tool's numbers
    SHAPE = "shape"  # theta[0], the shape c, as the original's comment intended

    @property
    def index(self) -> int:
        return 2 if self is Penalty.SCALE else 0


class FitStatus(enum.Enum):
    """What :func:`fit_reverse_weibull` did; ``value`` is written to summaries."""

    FIT = "fit"                          # the reverse Weibull location is the estimate
    MAXSAMP = "maxsamp"                  # method maxsamp: max(S) by request
    DEGENERATE = "degenerate"            # < 3 distinct values or no spread: max(S), no fit
    ALL_ZERO = "all_zero"                # every maximum is 0: estimate 0, bound infinite
    ILL_CONDITIONED = "ill_conditioned"  # best K-S p-value NaN or < MIN_PVALUE: max(S)
    NO_DATA = "no_finite_samples"        # nothing finite to estimate from: NaN


@dataclass(frozen=True)
class FitTrial:
    """The fit from one initial shape (the original's ``[DEBUG][L2]`` line).

    ``c``, ``loc``, ``scale``: weibull_min parameters of -S in the units of S
    (NaN when SciPy refused the optimum); ``ks``, ``pval``: the K-S test of -S.
    """

    c_init: float
    c: float
    loc: float
    scale: float
    ks: float
    pval: float


@dataclass(frozen=True)
class FitResult:
    """Lipschitz estimate from one array S of batch maxima.

    ``estimate`` is in the units of S (a gradient norm): -loc of the chosen
    fit, or max(S) when no fit is used (``fallback`` or method maxsamp).
    ``shape``, ``loc`` and ``scale`` are the weibull_min parameters of -S;
    ``ks`` and ``pval`` its K-S test. Without a fit, shape, scale, ks and pval
    are -1 and loc = -estimate, as the original printed them. ``trials`` holds
    every initial shape's fit; ``maximum`` is max(S).
    """

    estimate: float
    shape: float
    loc: float
    scale: float
    ks: float
    pval: float
    status: FitStatus
    n_used: int                  # finite maxima the estimate is based on
    n_dropped: int = 0           # non-finite entries removed from S
    c_init: float = math.nan     # initial shape of the chosen fit
    best_pval: float = math.nan  # best p-value of all starts (also on fallback)
    maximum: float = math.nan
    trials: tuple[FitTrial, ...] = ()

    @property
    def fallback(self) -> bool:
        """True when a fit was asked for but max(S) (or 0) had to be used."""
        return self.status not in (FitStatus.FIT, FitStatus.MAXSAMP)


def _no_fit(estimate: float, status: FitStatus, n_used: int, n_dropped: int,
            best_pval: float = math.nan, trials: tuple[FitTrial, ...] = ()) -> FitResult:
    return FitResult(estimate=estimate, shape=-1.0, loc=-estimate, scale=-1.0, ks=-1.0,
                     pval=-1.0, status=status, n_used=n_used, n_dropped=n_dropped,
                     best_pval=best_pval, maximum=estimate, trials=trials)


def nelder_mead(penalty_weight: float, penalty_index: int):
    """An ``optimizer`` for ``rv_continuous.fit``: ``scipy.optimize.fmin`` on f + w * theta[i]^2.

    With ``penalty_weight`` 0 it is plain ``fmin`` (the original's ``mle``).
    fmin's defaults (xtol = ftol = 1e-4, 200 * len(theta) iterations) are
    the original's.
    """
    from scipy.optimize import fmin

    if penalty_weight == 0.0:
        return fmin

    def optimizer(func, x0, args=(), disp=0):
        def penalised(theta, *extra):
            return func(theta, *extra) + penalty_weight * theta[penalty_index] ** 2
        return fmin(penalised, x0, args, disp=disp)
    return optimizer


def _trial(s: np.ndarray, x: np.ndarray, shift: float, spread: float, c0: float,
           optimizer) -> FitTrial:
    """Fit weibull_min to ``x`` = -(S - shift) / spread from shape c0; K-S test -S."""
    from scipy.stats import FitError, kstest, weibull_min

    try:
        c, loc_r, scale_r = weibull_min.fit(x, c0, optimizer=optimizer)
    except FitError as err:
        # Newer SciPy refuses an optimum outside the support where the
        # original's SciPy returned it; such a start cannot win on p-value.
        log.debug("weibull_min.fit from c0 = %g refused: %s", c0, err)
        return FitTrial(c0, math.nan, math.nan, math.nan, math.nan, math.nan)
    loc = -shift + loc_r * spread
    scale = scale_r * spread
    ks, pval = kstest(-s, "weibull_min", args=(c, loc, scale))
    return FitTrial(c0, float(c), float(loc), float(scale), float(ks), float(pval))


def fit_reverse_weibull(samples: np.ndarray, method: Method | str = Method.MLE_REG,
                        shape_reg: float = 0.01,
                        penalize: Penalty | str = Penalty.SCALE,
                        c_init: tuple[float, ...] = C_INIT) -> FitResult:
    """Estimate the right end point of the distribution of ``samples`` (docs/format.md).

    ``samples``: N batch maxima (any shape, flattened; float32 or float64 kept
    as stored, as the original computed in the file's dtype; non-finite
    entries are dropped and counted in ``n_dropped``). ``method``: ``mle_reg``
    (default), ``mle`` or ``maxsamp``. ``shape_reg``: weight of the mle_reg
    penalty on the parameter ``penalize`` (``scale``: the original's theta[2];
    ``shape``: c).

    Steps: shift = max(S), range = max(S) - min(S); weibull_min.fit of
    -(S - shift) / range from each shape in :data:`C_INIT`; loc and scale
    mapped back; K-S test of -S; the first fit with the highest p-value wins;
    max(S) if every p-value is NaN or the best is below :data:`MIN_PVALUE`.
    Arrays with fewer than 3 distinct values or no spread (relative to
    :data:`DEGENERATE_RTOL`) give max(S) with no fit.
    """
    method = Method(method)
    penalize = Penalty(penalize)
    s = np.asarray(samples)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    s = s.ravel()
    finite = np.isfinite(s)
    n_dropped = int(s.size - np.count_nonzero(finite))
    s = s[finite]
    if s.size == 0:
        return _no_fit(math.nan, FitStatus.NO_DATA, 0, n_dropped)
    shift = s.max()
    if method is Method.MAXSAMP:
        status = FitStatus.ALL_ZERO if shift == 0 and s.min() == 0 else FitStatus.MAXSAMP
        return _no_fit(float(shift), status, s.size, n_dropped)
    spread = shift - s.min()
    if spread == 0 and shift == 0:
        return _no_fit(0.0, FitStatus.ALL_ZERO, s.size, n_dropped)
    if spread <= DEGENERATE_RTOL * abs(shift) or np.unique(s).size < 3:
        return _no_fit(float(shift), FitStatus.DEGENERATE, s.size, n_dropped)

    weight = float(shape_reg) if method is Method.MLE_REG else 0.0
    optimizer = nelder_mead(weight, penalize.index)
    rescaled = (s - shift) / spread  # in [-1, 0], in the dtype of S as the original
    # SciPy warns about log(0), overflow in z**c and K-S of extreme shapes while
    # a search explores; those trials lose on p-value.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        trials = tuple(_trial(s, -rescaled, float(shift), float(spread), c0, optimizer)
                       for c0 in c_init)
    pvals = [t.pval for t in trials]
    best_p = max((p for p in pvals if not math.isnan(p)), default=math.nan)
    if math.isnan(best_p) or best_p < MIN_PVALUE:
        return _no_fit(float(shift), FitStatus.ILL_CONDITIONED, s.size, n_dropped, best_p,
                       trials)
    best = trials[pvals.index(best_p)]
    return FitResult(estimate=-best.loc, shape=best.c, loc=best.loc, scale=best.scale,
                     ks=best.ks, pval=best.pval, status=FitStatus.FIT, n_used=s.size,
                     n_dropped=n_dropped, c_init=best.c_init, best_pval=best_p,
                     maximum=float(shift), trials=trials)
