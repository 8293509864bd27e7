#!/usr/bin/env python3
"""Stage 2 of the CLEVER toolkit: reverse Weibull fits and CLEVER scores.

Reads the ``.mat`` files of stage 1 (this toolkit's or the original tool's,
SPEC section 3), estimates the local Lipschitz constant of every file and norm
by fitting a reverse Weibull distribution to the batch maxima of gradient norms
(SPEC section 4) and prints the CLEVER statistics in the original tool's format.

NumPy/SciPy only: this module never imports TensorFlow, directly or not.

Layers, from pure to impure:

* :func:`fit_reverse_weibull` (array in, :class:`FitResult` out),
  :func:`clever_bound` and :func:`second_order_bound`: the method.
* :func:`load_stage1_file` (one file in, :class:`StageOneFile` out) and
  :func:`score_folder` (a folder in, :class:`RunResult` out, no printing):
  what stage-1 tests and notebooks call in-process.
* :func:`debug_lines`, :func:`stats_lines`, :func:`write_summary`,
  :func:`plot_summary` and :func:`main`: the CLI.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import enum
import io
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

import common
from common import Norm, ToolError

log = logging.getLogger("clever.stage2")

PROG = "clever.py"

#: Initial shapes of the Nelder-Mead searches (SPEC section 4, step 2).
C_INIT: tuple[float, ...] = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)

#: Below this best K-S p-value the fit is rejected (SPEC section 4, step 3).
MIN_PVALUE = 1e-3

#: Maxima whose spread is below this fraction of their maximum are one value
#: with float32 rounding noise (stage 1 computes gradients in float32, eps
#: 1.2e-7): a linear model gives such arrays, and a fit to a few ulps of noise
#: would only add error to the exact answer, max(S).
DEGENERATE_RTOL = 1e-6

#: Nelder-Mead tolerances of ``scipy.optimize.fmin``, which the original used.
_NM_OPTIONS = {"xatol": 1e-4, "fatol": 1e-4, "maxiter": 600, "maxfev": 600}

#: Input dimension of the original tool's datasets, for files without ``dim``.
_DATASET_DIM = {"mnist": 28 * 28 * 1, "cifar": 32 * 32 * 3}

#: Keys of the data itself; other keys of a file are provenance to pass on.
_DATA_KEYS = frozenset({"G1_max", "G2_max", "Gi_max", "L1_max", "L2_max", "Li_max",
                        "H2_max", "g_x0", "g_x0_grad_2_norm", "pred", "id", "true_label",
                        "target_label", "info", "path"})

#: The bound norms in the order their lines are printed (bnd_norm 1, 2, i).
BOUND_NORMS: tuple[Norm, ...] = (Norm.L1, Norm.L2, Norm.LINF)


class Method(enum.Enum):
    """How the Lipschitz constant is estimated from the batch maxima."""

    MLE = "mle"
    MLE_REG = "mle_reg"
    MAXSAMP = "maxsamp"


class FitStatus(enum.Enum):
    """What :func:`fit_reverse_weibull` did; ``value`` is written to summaries."""

    FIT = "fit"                          # the reverse Weibull location is the estimate
    MAXSAMP = "maxsamp"                  # method maxsamp: max(S) by request
    DEGENERATE = "degenerate"            # < 3 distinct values or no spread: max(S), no fit
    ALL_ZERO = "all_zero"                # every maximum is 0: estimate 0, bound infinite
    ILL_CONDITIONED = "ill_conditioned"  # best K-S p-value NaN or < MIN_PVALUE: max(S)
    NO_DATA = "no_finite_samples"        # nothing finite to estimate from: NaN


# --------------------------------------------------------------------------
# The fit (pure)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    """Lipschitz estimate from one array S of batch maxima.

    ``estimate`` is in the units of S (a gradient norm): -loc of the fitted
    reverse Weibull, or max(S) when no fit is used (``fallback`` or method
    maxsamp). ``shape``, ``loc`` (= -estimate) and ``scale`` are the
    weibull_min parameters of -S in the units of S; ``ks`` and ``pval`` the
    one-sample Kolmogorov-Smirnov test of -S against them. Without a fit these
    four hold -1 and loc = -estimate, as the original tool printed them.
    """

    estimate: float
    shape: float
    loc: float
    scale: float
    ks: float
    pval: float
    status: FitStatus
    n_used: int          # finite maxima the estimate is based on
    n_dropped: int = 0   # non-finite entries removed from S
    c_init: float = math.nan      # initial shape of the chosen fit
    best_pval: float = math.nan   # best p-value of all starts (also on fallback)

    @property
    def fallback(self) -> bool:
        """True when a fit was asked for but max(S) (or 0) had to be used."""
        return self.status not in (FitStatus.FIT, FitStatus.MAXSAMP)


def _no_fit(estimate: float, status: FitStatus, n_used: int, n_dropped: int,
            best_pval: float = math.nan) -> FitResult:
    return FitResult(estimate=estimate, shape=-1.0, loc=-estimate, scale=-1.0, ks=-1.0,
                     pval=-1.0, status=status, n_used=n_used, n_dropped=n_dropped,
                     best_pval=best_pval)


def _weibull_nll(theta: np.ndarray, x: np.ndarray, x_min: float, shape_reg: float) -> float:
    """Negative log-likelihood of weibull_min(c, loc, scale) at x, plus shape_reg * c^2.

    Infeasible parameters (c <= 0, scale <= 0, a point at or below loc) give
    +inf, which Nelder-Mead treats as a worse vertex.
    """
    c, loc, scale = theta
    if not (c > 0.0 and scale > 0.0 and loc < x_min):
        return math.inf
    log_z = np.log((x - loc) / scale)
    nll = (x.size * (math.log(scale) - math.log(c)) - (c - 1.0) * log_z.sum()
           + np.exp(c * log_z).sum())
    value = float(nll) + shape_reg * c * c
    return value if math.isfinite(value) else math.inf


def _start(x: np.ndarray, c0: float) -> np.ndarray:
    """Moment-matching loc and scale for a given shape c0, kept feasible.

    x is -rescaled S: in [0, 1] with min 0. The search needs loc < min(x).
    """
    from scipy.special import gammaln

    g1 = math.exp(gammaln(1.0 + 1.0 / c0))
    var_unit = math.exp(gammaln(1.0 + 2.0 / c0)) - g1 * g1
    std = float(np.std(x))
    scale = std / math.sqrt(var_unit) if var_unit > 0 and math.isfinite(var_unit) else std
    loc = float(np.mean(x)) - scale * g1
    span = float(x.max() - x.min())
    if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0 and loc < x.min()):
        # Moments cannot place a Weibull of this shape below the data (tiny
        # c0): start just under the smallest point with the data's spread.
        loc = float(x.min()) - 0.01 * span
        scale = float(np.mean(x)) - loc
    return np.array([c0, loc, scale])


def weibull_min_mle(x: np.ndarray, c0: float, shape_reg: float = 0.0) -> tuple[float, float, float]:
    """Maximum-likelihood weibull_min(c, loc, scale) of x by Nelder-Mead from shape c0.

    ``x``: 1-D float array (here -rescaled maxima, so in [0, 1]); ``shape_reg``
    adds shape_reg * c^2 to the negative log-likelihood (0 is plain MLE).
    Returns (c, loc, scale) in the units of x.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, dtype=np.float64)
    res = minimize(_weibull_nll, _start(x, c0), args=(x, float(x.min()), shape_reg),
                   method="Nelder-Mead", options=_NM_OPTIONS)
    c, loc, scale = (float(v) for v in res.x)
    return c, loc, scale


def fit_reverse_weibull(samples: np.ndarray, method: Method | str = Method.MLE_REG,
                        shape_reg: float = 0.01) -> FitResult:
    """Estimate the right end point of the distribution of ``samples`` (SPEC section 4).

    ``samples``: array of N batch maxima of a gradient norm (any shape, flattened;
    non-finite entries are dropped and counted in ``n_dropped``).
    ``method``: ``mle_reg`` (default: regularised MLE), ``mle`` or ``maxsamp``.
    ``shape_reg``: weight of the c^2 penalty of ``mle_reg`` (ignored otherwise).

    Steps: shift = max(S), range = max(S) - min(S); fit weibull_min to
    -(S - shift) / range from each shape in :data:`C_INIT`; map loc and scale
    back; K-S test -S against each fit; keep the best p-value; fall back to
    max(S) if every p-value is NaN or the best is below :data:`MIN_PVALUE`.
    Arrays with fewer than 3 distinct values or no spread (relative to
    :data:`DEGENERATE_RTOL`) return max(S) exactly, with no fit.

    The penalty is on the shape c, as SPEC section 4 states. The original
    tool's regulariser read theta[2], which in SciPy's (c, loc, scale) order is
    the scale, so its ``mle_reg`` numbers can differ slightly from these
    (``mle`` and ``maxsamp`` are unaffected).
    """
    method = Method(method)
    s = np.asarray(samples, dtype=np.float64).ravel()
    finite = np.isfinite(s)
    n_dropped = int(s.size - np.count_nonzero(finite))
    s = s[finite]
    if s.size == 0:
        return _no_fit(math.nan, FitStatus.NO_DATA, 0, n_dropped)
    shift = float(s.max())
    if method is Method.MAXSAMP:
        status = FitStatus.ALL_ZERO if shift == 0.0 and s.min() == 0.0 else FitStatus.MAXSAMP
        return _no_fit(shift, status, s.size, n_dropped)
    spread = shift - float(s.min())
    if spread == 0.0 and shift == 0.0:
        return _no_fit(0.0, FitStatus.ALL_ZERO, s.size, n_dropped)
    if spread <= DEGENERATE_RTOL * abs(shift) or np.unique(s).size < 3:
        return _no_fit(shift, FitStatus.DEGENERATE, s.size, n_dropped)

    from scipy.stats import kstest

    shape_reg = float(shape_reg) if method is Method.MLE_REG else 0.0
    x = (shift - s) / spread  # -rescaled S: in [0, 1], 0 at the sample maximum
    best: tuple | None = None
    best_p = math.nan
    # SciPy warns about log(0), overflow in z**c and K-S of extreme shapes
    # while the search explores; those trials simply lose on p-value.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for c0 in C_INIT:
            c, loc_r, scale_r = weibull_min_mle(x, c0, shape_reg)
            loc = -shift + loc_r * spread
            scale = scale_r * spread
            ks, pval = kstest(-s, "weibull_min", args=(c, loc, scale))
            ks, pval = float(ks), float(pval)
            if not math.isnan(pval) and (math.isnan(best_p) or pval > best_p):
                best_p = pval
                best = (c, loc, scale, ks, pval, c0)
    if best is None or best_p < MIN_PVALUE:
        return _no_fit(shift, FitStatus.ILL_CONDITIONED, s.size, n_dropped, best_p)
    c, loc, scale, ks, pval, c0 = best
    return FitResult(estimate=-loc, shape=c, loc=loc, scale=scale, ks=ks, pval=pval,
                     status=FitStatus.FIT, n_used=s.size, n_dropped=n_dropped,
                     c_init=c0, best_pval=best_p)


# --------------------------------------------------------------------------
# Scores (pure)
# --------------------------------------------------------------------------
def clever_bound(g_x0: float, lipschitz: float) -> float:
    """First-order CLEVER bound g(x0) / L (SPEC section 1); +inf when L is 0.

    ``g_x0``: logit margin f_c(x0) - f_j(x0); ``lipschitz``: estimate of
    max ||grad g||_q in the dual norm q of the bound's norm p.
    """
    if lipschitz == 0.0:
        return math.inf if g_x0 > 0 else (math.nan if g_x0 == 0 else -math.inf)
    return float(g_x0) / float(lipschitz)


def second_order_bound(g_x0: float, grad_norm: float, curvature: float) -> float:
    """Second-order CLEVER L2 bound (GlobalSIP 2018, SPEC section 1).

    (-a + sqrt(a^2 + 2 g H)) / H with a = ||grad g(x0)||_2, g = g(x0) and
    H >= 0 the estimated magnitude of the most negative curvature, computed as
    the algebraically equal 2 g / (a + sqrt(a^2 + 2 g H)) (multiply by the
    conjugate), which has no cancellation for small H and tends to the
    first-order value g / a as H -> 0 instead of dividing 0 by 0.
    """
    g, a, h = float(g_x0), float(grad_norm), float(curvature)
    root = math.sqrt(a * a + 2.0 * g * h) if a * a + 2.0 * g * h >= 0 else math.nan
    denom = a + root
    if denom == 0.0:
        return math.inf if g > 0 else math.nan
    return 2.0 * g / denom


def cap_for(radius: float, sample_norm: Norm, bound_norm: Norm, dim: int | None) -> float | None:
    """The radius cap of a bound in ``bound_norm`` (see :func:`common.radius_cap`).

    Returns None when the cap depends on the input dimension and ``dim`` is
    unknown (a file of the original tool with no dataset hint).
    """
    if dim is None:
        # The cap is R / d^e with e >= 0; it needs d only when e > 0, i.e.
        # when it differs between d = 1 and d = 2.
        if common.radius_cap(radius, sample_norm, bound_norm, 2) != float(radius):
            return None
        dim = 1
    return common.radius_cap(radius, sample_norm, bound_norm, int(dim))


# --------------------------------------------------------------------------
# Stage-1 files
# --------------------------------------------------------------------------
class FileError(ToolError):
    """A problem with one input file; the run goes on with the other files."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, eq=False)
class StageOneFile:
    """One stage-1 file, read and checked (SPEC section 3).

    ``maxima`` maps each BOUND norm p to the array fitted for it (float64,
    shape (Niters,) or the first --num_samples of it): the batch maxima of the
    gradient's dual-norm q (``G{q}_max``), of the slope (``L{q}_max`` with
    --use_slope) or, for order 2, of |H2_max| for p = L2 only. ``keys`` names
    the stored key of each. ``radius``/``sample_norm``/``dim`` describe the
    sampling ball (file keys, else the ``args`` struct, else the original
    defaults, SPEC section 2); ``dim`` is None when unknown.
    """

    path: str
    img_id: int
    true_label: int
    target_label: int
    info: str
    order: int
    nsamps: int
    niters: int
    activation: str
    g_x0: float
    grad_norm: float  # ||grad g(x0)||_2 (order 2); NaN for order 1
    maxima: Mapping[Norm, np.ndarray]
    keys: Mapping[Norm, str]
    radius: float
    sample_norm: Norm
    dim: int | None
    provenance: Mapping[str, object] = field(default_factory=dict)

    @property
    def untargeted(self) -> bool:
        return is_untargeted_info(self.info)

    def sort_key(self) -> tuple:
        """The original's order (image id, then info), then target and path."""
        return (self.img_id, self.info, self.target_label, self.path)


def is_untargeted_info(info: str) -> bool:
    """True for the ``class<j>`` infos of an untargeted (all classes) run."""
    prefix = common.TargetKind.ALL.value
    return info.startswith(prefix) and info[len(prefix):].isdigit()


def _plain(value):
    """A loadmat (simplify_cells) value as a JSON-friendly Python value."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return [str(v) for v in value.ravel()] if value.size != 1 else str(value.ravel()[0])
        if value.dtype == object:
            return [_plain(v) for v in value.ravel()]
        if value.size == 1:
            return value.ravel()[0].item()
        return value.tolist() if value.size <= 64 else f"<array shape {value.shape}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _text(value) -> str:
    """A MATLAB string (str, array of str, 1-element cell) as a Python str."""
    value = _plain(value)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"expected one string, got {len(value)} values")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value.strip()


def _scalar(value) -> float:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got {arr.size} values")
    return float(arr[0])


def _integer(value) -> int:
    number = _scalar(value)
    if not number.is_integer():
        raise ValueError(f"expected an integer, got {number}")
    return int(number)


def _key(mat: Mapping, key: str, convert):
    """``convert(mat[key])``; KeyError if absent, ValueError naming the key if malformed."""
    if key not in mat:
        raise KeyError(key)
    try:
        return convert(mat[key])
    except (ValueError, TypeError) as err:
        raise ValueError(f"key {key!r}: {err}") from None


def _args_dict(mat: Mapping) -> dict:
    """The run's arguments: a struct (original tool), a dict or a JSON string."""
    raw = mat.get("args")
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    plain = _plain(raw)
    return plain if isinstance(plain, dict) else {}


def _sampling_ball(mat: Mapping, args: Mapping) -> tuple[float, Norm, int | None]:
    """Radius, norm and input dimension of the sampling ball of a file."""
    def lookup(name, convert, default):
        source = mat if name in mat else args
        return _key(source, name, convert) if name in source else default

    norm_name = lookup("sample_norm", lambda v: _text(v).lower(), "l2")
    if norm_name not in common.SAMPLE_NORMS:
        raise ValueError(f"key 'sample_norm': unknown norm {norm_name!r} (l2, li or l1)")
    radius = lookup("radius", _scalar, common.DEFAULT_RADIUS[norm_name])
    dataset = lookup("dataset", lambda v: _text(v).lower(), "")
    dim = lookup("dim", _integer, _DATASET_DIM.get(dataset))
    return radius, common.SAMPLE_NORMS[norm_name], dim


def _maxima(mat: Mapping, key: str, num_samples: int) -> np.ndarray:
    arr = _key(mat, key, lambda v: np.atleast_1d(np.asarray(v, dtype=np.float64)).ravel())
    if arr.size == 0:
        raise ValueError(f"{key} is empty")
    if num_samples:
        if num_samples > arr.size:
            raise ValueError(f"{key} has {arr.size} maxima, fewer than --num_samples "
                             f"{num_samples}")
        arr = arr[:num_samples]
    return arr


def load_stage1_file(path: str, *, use_slope: bool = False, num_samples: int = 0,
                     user_type: str = "") -> StageOneFile:
    """Read one stage-1 ``.mat`` file of either tool; raise :class:`FileError` if unusable.

    ``use_slope`` fits ``L*_max`` (SLOPE baseline) instead of ``G*_max``;
    ``num_samples`` > 0 keeps the first N maxima; ``user_type`` renames the
    info ``user`` (the original's --user_type, used for ImageNet runs whose
    targets came from a list).
    """
    import scipy.io

    try:
        name = common.MatName.parse(path)
    except ToolError:
        name = None
    try:
        mat = scipy.io.loadmat(path, simplify_cells=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise FileError(path, f"cannot read the .mat file ({type(err).__name__}: {err})") from None

    try:
        key_order = 2 if "H2_max" in mat else 1 if "G2_max" in mat or "L2_max" in mat else None
        if key_order is None:
            raise KeyError("G2_max")
        order = name.order if name is not None else key_order
        if order != key_order:
            raise ValueError(f"the file name says order {order} but the file holds order-"
                             f"{key_order} data ({'H2_max' if key_order == 2 else 'G2_max'})")

        maxima: dict[Norm, np.ndarray] = {}
        keys: dict[Norm, str] = {}
        if order == 1:
            for norm in BOUND_NORMS:
                grad = common.dual_norm(norm)
                keys[norm] = grad.slope_key if use_slope else grad.grad_key
                maxima[norm] = _maxima(mat, keys[norm], num_samples)
            grad_norm = math.nan
        elif order == 2:
            if use_slope:
                raise ValueError("--use_slope needs order-1 files (L1_max, L2_max, Li_max)")
            keys[Norm.L2] = "H2_max"
            # The original stored H2_max without abs for some runs; only the
            # magnitude of the negative curvature enters the bound.
            maxima[Norm.L2] = np.abs(_maxima(mat, "H2_max", num_samples))
            grad_norm = _key(mat, "g_x0_grad_2_norm", _scalar)
        else:
            raise ValueError(f"order {order} is not supported (1 or 2)")

        g_x0 = _key(mat, "g_x0", _scalar)
        if not (math.isfinite(g_x0) and (order == 1 or math.isfinite(grad_norm))):
            raise ValueError(f"g_x0 = {g_x0}" + ("" if order == 1 else
                             f", g_x0_grad_2_norm = {grad_norm}") + ": not finite")

        def field_or_name(key, attr, convert):
            if key in mat or name is None:
                return _key(mat, key, convert)
            return getattr(name, attr)

        img_id = field_or_name("id", "img_id", _integer)
        true_label = field_or_name("true_label", "true_label", _integer)
        target_label = field_or_name("target_label", "target_label", _integer)
        info = field_or_name("info", "info", _text)
        if user_type and info == common.TargetKind.USER.value:
            info = user_type
        args = _args_dict(mat)
        radius, sample_norm, dim = _sampling_ball(mat, args)
        nsamps = name.nsamps if name is not None else int(args.get("Nsamps", 0) or 0)
        niters = name.niters if name is not None else int(next(iter(maxima.values())).size)
        activation = name.activation if name is not None else ""
    except KeyError as err:
        raise FileError(path, f"lacks the key {err.args[0]!r}") from None
    except (ValueError, TypeError) as err:
        raise FileError(path, str(err)) from None

    provenance = {k: _plain(v) for k, v in mat.items()
                  if not k.startswith("__") and k not in _DATA_KEYS}
    return StageOneFile(path=path, img_id=img_id, true_label=true_label,
                        target_label=target_label, info=info, order=order, nsamps=nsamps,
                        niters=niters, activation=activation, g_x0=g_x0, grad_norm=grad_norm,
                        maxima=maxima, keys=keys, radius=radius, sample_norm=sample_norm,
                        dim=dim, provenance=provenance)


def find_mat_files(folder: str) -> list[str]:
    """All ``.mat`` files under ``folder`` (recursively), sorted; ToolError if none."""
    if not os.path.exists(folder):
        raise ToolError(f"{folder}: no such folder")
    if not os.path.isdir(folder):
        raise ToolError(f"{folder}: not a folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files
                     if f.endswith(".mat") and not f.startswith(".tmp-"))
    if not found:
        raise ToolError(f"{folder}: no .mat files found (searched recursively)")
    return sorted(found)


# --------------------------------------------------------------------------
# A run over a folder (no printing)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """What :func:`score_folder` does; the CLI flags of the same names."""

    untargeted: bool = False
    reduce: str = "mean"            # "mean" or "min" (--min)
    method: Method = Method.MLE_REG
    shape_reg: float = 0.01
    num_samples: int = 0            # 0: all maxima
    num_images: int = 0             # 0: all images
    user_type: str = ""
    use_slope: bool = False
    radius_cap: bool = True         # False: --no_radius_cap
    nthreads: int = 1               # 1: serial in this process
    plot_dir: str = ""
    progress: bool = False          # tqdm bar on stderr (terminals only)


@dataclass(frozen=True)
class NormScore:
    """The CLEVER bound of one file in one bound norm p."""

    norm: Norm                 # bound norm p
    key: str                   # the array fitted (G{q}_max, L{q}_max or H2_max)
    fit: FitResult             # Lipschitz (or curvature) estimate in the dual norm q
    bound_uncapped: float      # the original tool's number
    cap: float | None          # radius cap; None when unknown (no dim)
    bound: float               # min(bound_uncapped, cap)


@dataclass(frozen=True, eq=False)
class FileScore:
    """All bounds of one stage-1 file, keyed by bound norm (order 2: L2 only)."""

    file: StageOneFile
    scores: Mapping[Norm, NormScore]


@dataclass(frozen=True)
class Aggregate:
    """One ``[STATS]`` line: an info's summary (L0) or one image's (L1, untargeted)."""

    level: str                  # "L0" or "L1"
    info: str                   # info, or "untargeted"
    values: Mapping[Norm, float]
    image: int | None = None    # L1 lines
    n_classes: int | None = None  # L1 lines: files of the image + the true class


@dataclass(frozen=True, eq=False)
class RunResult:
    """Everything a run computed; printing and files are made from this."""

    options: Options
    order: int
    files: Sequence[FileScore]                 # sorted by image id, info, target
    aggregates: Sequence[Aggregate]            # in print order
    errors: Sequence[tuple[str, str]]          # (path, message), sorted by path
    skipped: Sequence[str] = ()                # files of the other mode (targeted/untargeted)

    def reported(self, score: NormScore) -> float:
        """The bound that is printed: capped unless --no_radius_cap."""
        return reported_bound(score, self.options.radius_cap)


def reported_bound(score: NormScore, radius_cap: bool) -> float:
    """``score.bound`` (capped) or, for --no_radius_cap, ``score.bound_uncapped``."""
    return score.bound if radius_cap else score.bound_uncapped


@dataclass(frozen=True)
class _FitTask:
    index: int            # file position in the sorted list
    norm: Norm
    samples: np.ndarray
    method: Method
    shape_reg: float
    plot_path: str        # "" for no plot
    plot_label: str


def _run_task(task: _FitTask) -> tuple[int, Norm, FitResult | None, str, str]:
    """Fit one array (and plot it); top level so a process pool can pickle it.

    Returns (index, norm, fit or None, fit error, plot error): an unexpected
    SciPy failure costs its file, not the run.
    """
    try:
        fit = fit_reverse_weibull(task.samples, task.method, task.shape_reg)
    except Exception as err:  # noqa: BLE001 - reported per file by the caller
        return task.index, task.norm, None, f"{type(err).__name__}: {err}", ""
    plot_error = ""
    if task.plot_path:
        try:
            plot_fit(task.samples, fit, task.plot_path, task.plot_label)
        except Exception as err:  # noqa: BLE001 - a failed figure must not lose the fit
            plot_error = f"{type(err).__name__}: {err}"
    return task.index, task.norm, fit, "", plot_error


def _plot_name(folder: str, path: str, norm: Norm, use_slope: bool) -> str:
    """``<relative path with / as __>_<L1|L2|Li>[_slope].png`` (unique per fit)."""
    rel = os.path.relpath(path, folder)
    stem = rel[:-4] if rel.endswith(".mat") else rel
    stem = stem.replace(os.sep, "__")
    return f"{stem}_{norm.label}{'_slope' if use_slope else ''}.png"


def _execute(tasks: list[_FitTask], nthreads: int, progress: bool) -> Iterable[tuple]:
    """Run fit tasks serially (nthreads 1) or in a process pool; yield as they finish."""
    from tqdm import tqdm

    def bar():
        # Made after the pool has forked its workers: no tqdm thread in them.
        return tqdm(total=len(tasks), desc="weibull fits", unit="fit", file=sys.stderr,
                    disable=None if progress else True, leave=False)

    if nthreads <= 1 or len(tasks) <= 1:
        with bar() as progress_bar:
            for task in tasks:
                yield _run_task(task)
                progress_bar.update()
        return
    # Forked workers inherit these instead of each spending a second importing them.
    import scipy.optimize  # noqa: F401
    import scipy.stats  # noqa: F401

    pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(nthreads, len(tasks)))
    try:
        futures = [pool.submit(_run_task, task) for task in tasks]
        with bar() as progress_bar:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
                progress_bar.update()
    except concurrent.futures.process.BrokenProcessPool as err:
        raise ToolError(f"a fit worker process died ({err}); rerun with --nthreads 1 "
                        "to see the problem") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _reduce(values: Sequence[float], how: str) -> float:
    if how == "min":
        return float(min(values))
    return float(sum(values) / len(values))


def _aggregate(files: Sequence[FileScore], options: Options, order: int) -> list[Aggregate]:
    """The ``[STATS]`` lines: per info (targeted) or per image, then overall (untargeted)."""
    def reported(score: NormScore) -> float:
        return reported_bound(score, options.radius_cap)

    norms = BOUND_NORMS if order == 1 else (Norm.L2,)
    out: list[Aggregate] = []
    if options.untargeted:
        per_image: dict[int, list[FileScore]] = {}
        for fs in files:
            per_image.setdefault(fs.file.img_id, []).append(fs)
        image_values: list[dict[Norm, float]] = []
        for img_id in sorted(per_image):
            group = per_image[img_id]
            values = {n: float(min(reported(fs.scores[n]) for fs in group)) for n in norms}
            image_values.append(values)
            out.append(Aggregate("L1", "untargeted", values, image=img_id,
                                 n_classes=len(group) + 1))
        if image_values:
            out.append(Aggregate("L0", "untargeted", {
                n: _reduce([v[n] for v in image_values], options.reduce) for n in norms}))
        return out
    per_info: dict[str, list[FileScore]] = {}
    for fs in files:
        per_info.setdefault(fs.file.info, []).append(fs)
    for info in sorted(per_info):
        out.append(Aggregate("L0", info, {
            n: _reduce([reported(fs.scores[n]) for fs in per_info[info]], options.reduce)
            for n in norms}))
    return out


def _select(loaded: list[StageOneFile], options: Options,
            errors: list[tuple[str, str]]) -> tuple[list[StageOneFile], int, list[str]]:
    """Keep the files of this mode and order, the first --num_images images."""
    wanted = [f for f in loaded if f.untargeted == options.untargeted]
    skipped = [f.path for f in loaded if f.untargeted != options.untargeted]
    orders = [f.order for f in wanted]
    # The run's order is the one most files have (1 on a tie); a file of the
    # other order mixed in is reported, not silently averaged with the rest.
    order = 2 if orders.count(2) > orders.count(1) else 1
    kept = []
    for f in wanted:
        if f.order != order:
            errors.append((f.path, f"an order-{f.order} file among order-{order} files; "
                                   "process it on its own"))
        else:
            kept.append(f)
    kept.sort(key=StageOneFile.sort_key)
    if options.num_images:
        images = sorted({f.img_id for f in kept})[:options.num_images]
        keep_ids = set(images)
        kept = [f for f in kept if f.img_id in keep_ids]
    return kept, order, skipped


def score_folder(folder: str, options: Options = Options()) -> RunResult:
    """Fit every stage-1 file under ``folder`` and compute the CLEVER statistics.

    Raises :class:`ToolError` for a missing/empty folder or when no file of the
    requested mode is left; per-file problems go to ``RunResult.errors`` and
    the other files are still scored. Prints nothing (a tqdm bar on stderr if
    ``options.progress``); with ``options.plot_dir`` writes one PNG per fit.
    """
    method = Method(options.method)
    paths = find_mat_files(folder)
    errors: list[tuple[str, str]] = []
    loaded = []
    for path in paths:
        try:
            loaded.append(load_stage1_file(path, use_slope=options.use_slope,
                                           num_samples=options.num_samples,
                                           user_type=options.user_type))
        except FileError as err:
            errors.append((err.path, err.message))
    files, order, skipped = _select(loaded, options, errors)
    if skipped:
        kind = "targeted" if options.untargeted else "untargeted (class<j>)"
        log.info("skipped %d %s files; %s", len(skipped), kind,
                 "drop --untargeted for them" if options.untargeted else "use --untargeted")
    if not files and not errors:
        hint = ("no untargeted (info class<j>) files; drop --untargeted" if options.untargeted
                else "only untargeted (info class<j>) files; use --untargeted")
        raise ToolError(f"{folder}: {hint}")

    if options.plot_dir:
        os.makedirs(options.plot_dir, exist_ok=True)
    tasks = []
    for index, f in enumerate(files):
        for norm, samples in f.maxima.items():
            plot_path = (os.path.join(options.plot_dir,
                                      _plot_name(folder, f.path, norm, options.use_slope))
                         if options.plot_dir else "")
            label = (f"id {f.img_id}, {f.info}, target {f.target_label}: "
                     f"{f.keys[norm]} for the {norm.label} bound")
            tasks.append(_FitTask(index, norm, samples, method, options.shape_reg,
                                  plot_path, label))
    fits: dict[tuple[int, Norm], FitResult | str] = {}
    for index, norm, fit, fit_error, plot_error in _execute(tasks, options.nthreads,
                                                            options.progress):
        fits[(index, norm)] = fit if fit is not None else fit_error
        if plot_error:
            log.warning("%s: could not plot the %s fit: %s", files[index].path, norm.label,
                        plot_error)

    scored: list[FileScore] = []
    for index, f in enumerate(files):
        scores = {}
        failed = ""
        for norm in f.maxima:
            fit = fits[(index, norm)]
            if isinstance(fit, str):
                failed = f"the fit of {f.keys[norm]} failed ({fit})"
                break
            _log_fit(f, norm, fit)
            if fit.status is FitStatus.NO_DATA:
                failed = f"{f.keys[norm]} has no finite values (all NaN or inf)"
                break
            if f.order == 1:
                uncapped = clever_bound(f.g_x0, fit.estimate)
            else:
                uncapped = second_order_bound(f.g_x0, f.grad_norm, fit.estimate)
            cap = cap_for(f.radius, f.sample_norm, norm, f.dim)
            if cap is None:
                log.debug("%s: input dimension unknown: the %s bound (samples in an %s ball) "
                          "is not capped", f.path, norm.label, f.sample_norm.label)
            bound = uncapped if cap is None or math.isnan(uncapped) else min(uncapped, cap)
            scores[norm] = NormScore(norm, f.keys[norm], fit, uncapped, cap, bound)
        if failed:
            errors.append((f.path, failed))
        else:
            scored.append(FileScore(f, scores))

    return RunResult(options=options, order=order, files=scored,
                     aggregates=_aggregate(scored, options, order), errors=sorted(errors),
                     skipped=skipped)


def _log_fit(f: StageOneFile, norm: Norm, fit: FitResult) -> None:
    """Diagnostics of one fit, logged in the main process in print order."""
    where = f"{f.path}: {f.keys[norm]}"
    if fit.n_dropped:
        log.warning("%s: dropped %d NaN/inf maxima of %d (NaN gradients?)", where,
                    fit.n_dropped, fit.n_dropped + fit.n_used)
    if fit.status is FitStatus.ALL_ZERO and f.order == 2:
        log.warning("%s: every curvature maximum is 0: the bound is the first-order "
                    "limit g_x0 / ||grad g(x0)||_2", where)
    elif fit.status is FitStatus.ALL_ZERO:
        log.warning("%s: every maximum is 0: the Lipschitz estimate is 0 and the %s bound "
                    "infinite (capped at the radius unless --no_radius_cap); gradient "
                    "masking or a constant model?%s", where, norm.label,
                    " (was stage 1 run with --compute_slope?)" if f.keys[norm][0] == "L" else "")
    elif fit.status is FitStatus.ILL_CONDITIONED:
        log.warning("%s: ill-conditioned maxima (best K-S p-value %.3g < %g): using the "
                    "maximum sample value", where, fit.best_pval, MIN_PVALUE)
    elif fit.status is FitStatus.DEGENERATE:
        log.debug("%s: fewer than 3 distinct maxima or no spread: estimate = max = %.6g",
                  where, fit.estimate)


# --------------------------------------------------------------------------
# Printed lines (the format of SPEC section 4)
# --------------------------------------------------------------------------
def debug_lines(result: RunResult) -> list[str]:
    """``[DEBUG][L1]`` lines: one per file and bound norm, in the original's order."""
    lines = []
    for fs in result.files:
        f = fs.file
        for norm in BOUND_NORMS:
            if norm not in fs.scores:
                continue
            s = fs.scores[norm]
            lines.append(
                f"[DEBUG][L1] id = {f.img_id}, true_label = {f.true_label}, "
                f"target_label = {f.target_label}, info = {f.info}, nsamps = {f.nsamps}, "
                f"niters = {f.niters}, bnd_norm = {norm.value}, bnd = {result.reported(s):.5g}, "
                f"ks = {s.fit.ks:.5g}, pVal = {s.fit.pval:.5g}, shape = {s.fit.shape:.5g}, "
                f"loc = {s.fit.loc:.5g}, scale = {s.fit.scale:.5g}, g_x0 = {f.g_x0:.5g}")
    return lines


def stats_lines(result: RunResult) -> list[str]:
    """``[STATS][L1]`` (untargeted, per image) and ``[STATS][L0]`` summary lines."""
    lines = []
    for agg in result.aggregates:
        if agg.level == "L1":
            values = ", ".join(f"clever_{n.label} = {v:.5g}" for n, v in agg.values.items())
            lines.append(f"[STATS][L1] image = {agg.image:3d}, n_classes = {agg.n_classes:3d}, "
                         f"{values}")
        else:
            values = ", ".join(f"{agg.info}_clever_{n.label} = {v:.5g}"
                               for n, v in agg.values.items())
            lines.append(f"[STATS][L0] info = {agg.info}, {values}")
    return lines


# --------------------------------------------------------------------------
# Summary files
# --------------------------------------------------------------------------
def _finite_or_none(value):
    """Strict JSON has no NaN/Infinity: write null (the status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


_NORM_FIELDS = ("key", "estimate", "shape", "loc", "scale", "ks", "pval", "bound",
                "bound_uncapped", "cap", "fallback", "status", "n_used", "n_dropped")


def _norm_record(s: NormScore) -> dict:
    return {"key": s.key, "estimate": s.fit.estimate, "shape": s.fit.shape, "loc": s.fit.loc,
            "scale": s.fit.scale, "ks": s.fit.ks, "pval": s.fit.pval, "bound": s.bound,
            "bound_uncapped": s.bound_uncapped, "cap": s.cap, "fallback": s.fit.fallback,
            "status": s.fit.status.value, "n_used": s.fit.n_used,
            "n_dropped": s.fit.n_dropped}


def file_records(result: RunResult) -> list[dict]:
    """One JSON-ready record per scored file (see :func:`write_summary`)."""
    records = []
    for fs in result.files:
        f = fs.file
        records.append({
            "path": f.path, "id": f.img_id, "true_label": f.true_label,
            "target_label": f.target_label, "info": f.info, "order": f.order,
            "nsamps": f.nsamps, "niters": f.niters, "g_x0": f.g_x0,
            "g_x0_grad_2_norm": None if f.order == 1 else f.grad_norm,
            "radius": f.radius, "sample_norm": f.sample_norm.label.lower(), "dim": f.dim,
            "norms": {n.label: _norm_record(fs.scores[n]) for n in BOUND_NORMS
                      if n in fs.scores},
            "file_provenance": dict(f.provenance),
        })
    return records


def _aggregate_record(agg: Aggregate) -> dict:
    record = {"level": agg.level, "info": agg.info}
    if agg.level == "L1":
        record.update(image=agg.image, n_classes=agg.n_classes)
    record.update({f"clever_{n.label}": v for n, v in agg.values.items()})
    return record


def write_summary(result: RunResult, path: str, args: Mapping | None = None) -> str:
    """Write the run's JSON summary at ``path`` and a CSV of its file records next to it.

    JSON: ``provenance`` (:func:`common.provenance`), ``options``, ``records``
    (one per file: ids, labels, info, order, nsamps, niters, g_x0, sampling
    ball, per bound norm the fit and the bound capped and uncapped, and the
    file's own provenance keys), ``aggregates`` (the numbers of the
    ``[STATS]`` lines) and ``errors``. Non-finite numbers are written as null.
    Returns the CSV path.
    """
    options = result.options
    summary = {
        "provenance": common.provenance(args),
        "options": {k: (v.value if isinstance(v, enum.Enum) else v)
                    for k, v in vars(options).items()},
        "order": result.order,
        "reported_bounds": "capped" if options.radius_cap else "uncapped",
        "records": file_records(result),
        "aggregates": [_aggregate_record(a) for a in result.aggregates],
        "errors": [{"path": p, "error": m} for p, m in result.errors],
    }
    common.write_json(path, _finite_or_none(summary))

    stem, _ = os.path.splitext(path)
    csv_path = stem + ".csv"
    header = ["path", "id", "true_label", "target_label", "info", "order", "nsamps", "niters",
              "g_x0", "g_x0_grad_2_norm", "radius", "sample_norm", "dim"]
    header += [f"{n.label}_{k}" for n in BOUND_NORMS for k in _NORM_FIELDS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for rec in file_records(result):
        row = [rec[k] for k in header[:13]]
        for n in BOUND_NORMS:
            norm_rec = rec["norms"].get(n.label, {})
            row += [norm_rec.get(k, "") for k in _NORM_FIELDS]
        writer.writerow(["" if v is None else v for v in row])
    common.atomic_write_text(csv_path, buf.getvalue())
    return csv_path


# --------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas; imported only when asked for)
# --------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_fit(samples: np.ndarray, fit: FitResult, path: str, label: str = "") -> None:
    """Histogram of -S with the fitted weibull_min pdf, titled with c, loc, scale, ks, pVal."""
    from scipy.stats import weibull_min

    s = np.asarray(samples, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if s.size:
        ax.hist(-s, bins=20, density=True, histtype="stepfilled", alpha=0.5,
                label="-S (batch maxima)")
    if fit.status is FitStatus.FIT:
        lo, hi = -1.01 * float(s.max()), -0.99 * float(s.min())
        lo, hi = min(lo, hi, fit.loc), max(lo, hi)
        x = np.linspace(lo, hi, 200)
        with np.errstate(all="ignore"):
            ax.plot(x, weibull_min.pdf(x, fit.shape, fit.loc, fit.scale), "r-",
                    label="fitted weibull_min pdf")
        title = (f"c = {fit.shape:.2f}, loc = {fit.loc:.4g}, scale = {fit.scale:.4g}, "
                 f"ks = {fit.ks:.2f}, pVal = {fit.pval:.2f}")
    else:
        title = f"no fit ({fit.status.value}): estimate = max(S) = {fit.estimate:.4g}"
    if math.isfinite(fit.estimate):
        ax.axvline(-fit.estimate, color="k", linestyle="--", label="-estimate")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("-(maximum gradient norm)")
    ax.set_ylabel("pdf")
    if label:
        fig.suptitle(label, fontsize=8)
    ax.legend(loc="best", frameon=False, fontsize=8)
    fig.savefig(path)


def plot_summary(result: RunResult, path: str) -> None:
    """Per image, the CLEVER L2 score of every target (and the minimum if untargeted)."""
    fig = _figure(max(6.4, 0.25 * len({fs.file.img_id for fs in result.files}) + 2), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    images = sorted({fs.file.img_id for fs in result.files})
    position = {img: i for i, img in enumerate(images)}
    series: dict[str, tuple[list, list]] = {}
    for fs in result.files:
        name = "per class" if result.options.untargeted else fs.file.info
        xs, ys = series.setdefault(name, ([], []))
        xs.append(position[fs.file.img_id])
        ys.append(result.reported(fs.scores[Norm.L2]))
    markers = "os^vDP*X"
    for i, (name, (xs, ys)) in enumerate(sorted(series.items())):
        offset = 0.0 if result.options.untargeted else (i - (len(series) - 1) / 2) * 0.15
        ax.scatter(np.asarray(xs) + offset, ys, s=18, marker=markers[i % len(markers)],
                   label=name, alpha=0.8)
    per_image = [a for a in result.aggregates if a.level == "L1"]
    if per_image:
        ax.plot([position[a.image] for a in per_image], [a.values[Norm.L2] for a in per_image],
                "k_", markersize=14, label="CLEVER-u (min)")
    ax.set_xticks(range(len(images)))
    ax.set_xticklabels([str(i) for i in images], rotation=90, fontsize=7)
    ax.set_xlabel("image id")
    ax.set_ylabel("CLEVER L2 score" + ("" if result.options.radius_cap else " (uncapped)"))
    ax.set_title(f"CLEVER L2 per target ({result.options.method.value}, order {result.order})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compute CLEVER scores from the gradient-norm maxima of stage 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data_folder", help="folder of stage-1 .mat files (searched recursively)")
    parser.add_argument("--untargeted", action="store_true",
                        help="score the untargeted run (files with info class<j>): per image "
                             "the minimum over classes, then the mean over images")
    parser.add_argument("--min", action="store_true",
                        help="report the minimum of the CLEVER scores instead of the mean")
    parser.add_argument("--num_samples", type=int, default=0,
                        help="use only the first N maxima of each file (0: all)")
    parser.add_argument("--num_images", type=int, default=0,
                        help="use only the first N image ids, in sorted order (0: all)")
    parser.add_argument("--shape_reg", type=float, default=0.01,
                        help="weight of the shape penalty c^2 of --method mle_reg")
    parser.add_argument("--nthreads", type=int, default=os.cpu_count() or 1,
                        help="worker processes for the fits (1: serial; 0: all cores)")
    parser.add_argument("--plot_dir", default="",
                        help="write a PNG per fit and a summary figure here (empty: none)")
    parser.add_argument("--method", choices=[m.value for m in Method], default="mle_reg",
                        help="Lipschitz estimate: regularised MLE (default), MLE or the "
                             "sample maximum")
    parser.add_argument("--user_type", default="",
                        help="report files whose info is 'user' under this info instead "
                             "(e.g. top2 for ImageNet targets from a list)")
    parser.add_argument("--use_slope", action="store_true",
                        help="fit the slope maxima L1_max/L2_max/Li_max (stage 1 "
                             "--compute_slope) instead of the gradient norms")
    parser.add_argument("--no_radius_cap", action="store_true",
                        help="do not cap scores at the sampling radius (the original "
                             "tool's numbers)")
    parser.add_argument("--summary", default="", metavar="PATH",
                        help="write a JSON summary here and a CSV of the per-file records "
                             "next to it")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics on stderr (-vv for debug)")
    args = parser.parse_args(list(argv))
    common.check_positive("--num_samples", args.num_samples, allow_zero=True)
    common.check_positive("--num_images", args.num_images, allow_zero=True)
    common.check_positive("--shape_reg", args.shape_reg, allow_zero=True)
    common.check_positive("--nthreads", args.nthreads, allow_zero=True)
    if args.nthreads == 0:
        args.nthreads = os.cpu_count() or 1
    if args.summary and args.summary.lower().endswith(".csv"):
        raise ToolError(f"--summary {args.summary}: give the JSON path (e.g. run.json); "
                        "the CSV is written next to it")
    return args


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(untargeted=args.untargeted, reduce="min" if args.min else "mean",
                   method=Method(args.method), shape_reg=args.shape_reg,
                   num_samples=args.num_samples, num_images=args.num_images,
                   user_type=args.user_type, use_slope=args.use_slope,
                   radius_cap=not args.no_radius_cap, nthreads=args.nthreads,
                   plot_dir=args.plot_dir, progress=True)


def main(args: argparse.Namespace) -> int:
    """Score ``args.data_folder``; print the statistics; 1 if any file failed."""
    common.setup_logging(args.verbose)
    result = score_folder(args.data_folder, options_from_args(args))
    for line in debug_lines(result) + stats_lines(result):
        print(line)
    sys.stdout.flush()
    if args.plot_dir and result.files:
        summary_png = os.path.join(args.plot_dir, "clever_summary_L2.png")
        try:
            plot_summary(result, summary_png)
        except Exception as err:  # noqa: BLE001 - figures are extras; numbers are printed
            log.warning("%s: could not draw the summary figure: %s", summary_png, err)
    if args.summary:
        csv_path = write_summary(result, args.summary, vars(args))
        log.info("summary written to %s and %s", args.summary, csv_path)
    for path, message in result.errors:
        print(f"{PROG}: error: {path}: {message}", file=sys.stderr)
    if result.errors:
        log.error("%d file(s) failed; the statistics above leave them out", len(result.errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
