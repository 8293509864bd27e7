"""Early stopping of stage 1 once the Lipschitz estimates have converged (--converge).

Stage 1 spends nearly all of its time drawing N_b batches of N_s gradients per
image, while the paper notes that 50 to 100 batches are usually enough. This
module decides, from the batch maxima collected so far, when the stage-2
estimates of an image no longer move, so that stage 1 can stop the image early.

:class:`ConvergenceRule` is the rule (a frozen, hashable configuration); the
rule itself is pure: :meth:`ConvergenceRule.check` takes the maxima of one image
and the earlier checks, fits stage 2's reverse Weibull (its default method, in
this process) to every (target, norm) column and returns a :class:`Check`
record. :func:`make_stop_rule` wraps a rule into the ``stop_rule(iteration_done,
grad_so_far) -> (stop, check_record)`` callable of ``stage1.score_image``, which
keeps the history of one image.

The rule (all of it must hold at a check, for every (target, norm) column):

* at least ``min_iters`` batches have been collected (checks before are skipped);
* the fitted estimate moved, since the previous check, by less than ``tol``
  (relative) or by less than ``noise_factor`` times its own sampling noise, at
  each of the last ``stable_checks`` checks. The noise is measured on the run
  itself: stage 2's fit of the even-numbered and of the odd-numbered batches
  (two independent half runs) differ by ``spread`` = |fit_even - fit_odd| /
  estimate. A move smaller than that is a move the data cannot resolve, and
  sampling further would only trade it for another of the same size: on ReLU
  networks, whose largest gradient norms keep rising slowly, the estimate never
  settles to 1% while two seeds of the full run differ by tens of percent.
  The halves are fitted only at checks where some column moved by ``tol`` or
  more; ``noise_factor`` 0 turns the criterion off (the fixed-tolerance rule);
* the fit is accepted: its K-S p-value is above ``min_pvalue``, or the column is
  degenerate (one value, e.g. a linear model, whose maximum is exact).

NumPy/SciPy only (no TensorFlow import).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from common import ToolError

from weibull_fit import FitStatus, fit_reverse_weibull

#: Default minimum K-S p-value of an accepted fit (the issue's 0.05).
MIN_PVALUE = 0.05

#: Statuses whose estimate is exact without a fit (the p-value does not apply).
_EXACT = (FitStatus.DEGENERATE, FitStatus.ALL_ZERO)


@dataclass(frozen=True)
class ConvergenceRule:
    """When to stop sampling one image: see the module docstring.

    ``tol``: largest relative change of every estimate between consecutive
    checks (e.g. 0.01 for 1%). ``min_iters``: batches before the first check;
    ``check_every``: batches between checks (checks fall on iterations that are
    multiples of ``check_every`` and at least ``min_iters``).
    ``stable_checks``: how many consecutive checks must each show a change below
    the threshold. ``noise_factor``: a change below ``noise_factor * spread`` also
    counts as stable (0: only ``tol``). ``min_pvalue``: smallest K-S p-value of an accepted fit.
    ``method``, ``shape_reg`` and ``penalize``: stage 2's fit (its defaults).
    """

    tol: float
    min_iters: int = 100
    check_every: int = 25
    stable_checks: int = 1
    noise_factor: float = 2.0
    min_pvalue: float = MIN_PVALUE
    method: str = "mle_reg"
    shape_reg: float = 0.01
    penalize: str = "scale"

    def __post_init__(self):
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise ToolError(f"--converge: the tolerance must be a positive number, not {self.tol}")
        if not (isinstance(self.min_iters, (int, np.integer)) and self.min_iters >= 1):
            raise ToolError(f"--min_iters: must be a positive integer, not {self.min_iters}")
        if not (isinstance(self.check_every, (int, np.integer)) and self.check_every >= 1):
            raise ToolError(f"--check_every: must be a positive integer, not {self.check_every}")
        if not (isinstance(self.stable_checks, (int, np.integer)) and self.stable_checks >= 1):
            raise ToolError(f"stable_checks: must be a positive integer, not {self.stable_checks}")
        if not (math.isfinite(self.noise_factor) and self.noise_factor >= 0):
            raise ToolError(f"--converge_noise: must be a number >= 0, not {self.noise_factor}")
        if not 0.0 <= self.min_pvalue < 1.0:
            raise ToolError(f"min_pvalue: must be in [0, 1), not {self.min_pvalue}")

    def is_check_point(self, iteration_done: int) -> bool:
        """True when a check is due after ``iteration_done`` batches."""
        return iteration_done >= self.min_iters and iteration_done % self.check_every == 0

    def first_check(self) -> int:
        """The number of batches at the first check (the first multiple of
        ``check_every`` that is at least ``min_iters``)."""
        return -(-self.min_iters // self.check_every) * self.check_every

    def earliest_stop(self) -> int:
        """The fewest batches after which the rule can stop (it needs
        ``stable_checks`` changes, so ``stable_checks + 1`` checks)."""
        return self.first_check() + self.stable_checks * self.check_every

    def check(self, iteration_done: int, maxima: np.ndarray,
              history: Sequence["Check"] = ()) -> "Check":
        """Fit every column of ``maxima`` and decide whether to stop.

        ``maxima``: [it, T, K] float batch maxima collected so far for T targets
        and K norms (K = 3 gradient L1, L2, L-inf; 1 for order 2), or [it] / [it, T]
        (a single norm / target); only its first ``iteration_done`` rows are used.
        ``history``: the earlier checks of the same image, oldest first.
        Returns the :class:`Check` (estimates and p-values [T, K]) whose ``stop``
        says whether sampling can end.
        """
        m = _as_3d(maxima)[:iteration_done]
        if m.shape[0] < iteration_done:
            raise ValueError(f"maxima has {m.shape[0]} rows, fewer than the {iteration_done} "
                             "iterations done")
        estimates, pvalues, exact = self.fit_columns(m)
        spread = (self.spread_columns(m, estimates)
                  if self.needs_spread(estimates, history) else None)
        return self.decide(iteration_done, estimates, pvalues, exact, history, spread)

    def needs_spread(self, estimates: np.ndarray, history: Sequence["Check"] = ()) -> bool:
        """Whether the half-run fits can change the decision: some column moved by
        ``tol`` or more since the previous check, and the noise criterion is on."""
        if self.noise_factor <= 0 or not history:
            return False
        return bool(np.any(relative_change(estimates, history[-1].estimates) >= self.tol))

    def spread_columns(self, maxima: np.ndarray, estimates: np.ndarray) -> np.ndarray:
        """Sampling noise of every column's estimate, [T, K]: |fit(even batches) -
        fit(odd batches)| / |estimate|, from ``maxima`` [it, T, K] (0 where the
        estimate is exact or 0; +inf where a half cannot be fitted)."""
        m = _as_3d(maxima)
        even, _, _ = self.fit_columns(m[0::2])
        odd, _, _ = self.fit_columns(m[1::2])
        return half_spread(even, odd, estimates)

    def fit_columns(self, maxima: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage 2's fit of every column of ``maxima`` [it, T, K].

        Returns (estimates, p-values, exact), each [T, K]: Lipschitz estimates,
        K-S p-values (-1 without a fit) and whether the estimate is exact without
        a fit (degenerate or all-zero column)."""
        m = _as_3d(maxima)
        n_t, n_k = m.shape[1:]
        estimates = np.full((n_t, n_k), np.nan)
        pvalues = np.full((n_t, n_k), np.nan)
        exact = np.zeros((n_t, n_k), bool)
        for t in range(n_t):
            for k in range(n_k):
                fit = self.fit(m[:, t, k])
                estimates[t, k] = fit.estimate
                pvalues[t, k] = fit.pval
                exact[t, k] = fit.status in _EXACT
        return estimates, pvalues, exact

    def decide(self, iteration_done: int, estimates: np.ndarray, pvalues: np.ndarray,
               exact: np.ndarray, history: Sequence["Check"] = (),
               spread: np.ndarray | None = None) -> "Check":
        """The rule's decision from fitted columns ([T, K] arrays of :meth:`fit_columns`),
        the earlier checks and, where fitted, the half-run ``spread`` [T, K] of
        :meth:`spread_columns` (None: not fitted, the threshold is ``tol``). Pure:
        :meth:`check` = fit_columns + (spread_columns) + decide."""
        estimates = np.asarray(estimates, np.float64)
        pvalues = np.asarray(pvalues, np.float64)
        accepted = np.asarray(exact, bool) | (pvalues > self.min_pvalue)  # NaN never accepted
        change = np.full(estimates.shape, np.inf)
        if history:
            change = relative_change(estimates, history[-1].estimates)
        threshold = np.full(estimates.shape, float(self.tol))
        if spread is not None:
            noise = self.noise_factor * np.asarray(spread, np.float64)
            threshold = np.maximum(threshold, np.where(np.isfinite(noise), noise, 0.0))
        stable = bool(np.all(change < threshold))
        # Stop after ``stable_checks`` consecutive stable checks, this one included,
        # with every fit accepted now.
        need = self.stable_checks - 1
        previous = list(history[-need:]) if need else []
        enough = len(previous) == need and all(c.stable for c in previous)
        stop = (iteration_done >= self.min_iters and stable and enough
                and bool(np.all(accepted)))
        return Check(iteration=int(iteration_done), estimates=estimates, pvalues=pvalues,
                     change=change, accepted=accepted, stable=stable, stop=stop,
                     spread=None if spread is None else np.asarray(spread, np.float64))

    def fit(self, samples: np.ndarray):
        """Stage 2's fit of one column of maxima with this rule's settings."""
        return fit_reverse_weibull(samples, method=self.method, shape_reg=self.shape_reg,
                                   penalize=self.penalize)

    def to_dict(self) -> dict:
        """The rule's parameters (JSON-ready), for provenance."""
        return asdict(self)


def relative_change(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """|new - old| / |old| elementwise; 0 where both are equal (0 -> 0 included),
    +inf where old is 0 and new is not or either is NaN."""
    new = np.asarray(new, np.float64)
    old = np.asarray(old, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(new - old) / np.abs(old)
    out = np.where(new == old, 0.0, out)
    return np.where(np.isfinite(out), out, np.inf)


def half_spread(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The half-run spread |a - b| / |ref| elementwise (a, b: the estimates of the
    even and odd batches; ref: the estimate of all), 0 where a equals b, +inf
    where undefined."""
    a, b, ref = (np.asarray(v, np.float64) for v in (a, b, ref))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(a - b) / np.abs(ref)
    out = np.where(a == b, 0.0, out)
    return np.where(np.isfinite(out), out, np.inf)


@dataclass(frozen=True)
class Check:
    """One check of an image: ``estimates``, ``pvalues``, ``change`` and
    ``accepted`` are [T, K] (Lipschitz estimates in the units of the maxima,
    K-S p-values (-1 without a fit), relative change since the previous check
    (inf at the first), fit accepted); ``stable``: every change below its
    threshold; ``stop``: the rule says stop after ``iteration`` batches;
    ``spread``: [T, K] half-run noise where it was fitted, else None."""

    iteration: int
    estimates: np.ndarray
    pvalues: np.ndarray
    change: np.ndarray
    accepted: np.ndarray
    stable: bool
    stop: bool
    spread: np.ndarray | None = None

    def to_record(self) -> dict:
        """A JSON-ready dict (NaN and inf become None) for files' provenance."""
        return {"iteration": self.iteration, "estimates": _jsonable(self.estimates),
                "pvalues": _jsonable(self.pvalues), "change": _jsonable(self.change),
                "spread": None if self.spread is None else _jsonable(self.spread),
                "stable": self.stable, "stop": self.stop}


def _jsonable(a: np.ndarray) -> list:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in np.asarray(a)]


def _as_3d(maxima: np.ndarray) -> np.ndarray:
    m = np.asarray(maxima, dtype=np.float64)
    if m.ndim == 1:
        return m[:, None, None]
    if m.ndim == 2:
        return m[:, :, None]
    if m.ndim != 3:
        raise ValueError(f"maxima must be [it], [it, T] or [it, T, K], not shape {m.shape}")
    return m


@dataclass
class Monitor:
    """The checks of one image under a rule (the state that the rule does not keep)."""

    rule: ConvergenceRule
    checks: list[Check] = field(default_factory=list)

    def __call__(self, iteration_done: int, grad_so_far: np.ndarray) -> tuple[bool, dict | None]:
        """The ``stop_rule`` of ``stage1.score_image``: ``grad_so_far`` [it, T, K]."""
        if not self.rule.is_check_point(iteration_done):
            return False, None
        check = self.rule.check(iteration_done, grad_so_far, self.checks)
        self.checks.append(check)
        return check.stop, check.to_record()


def make_stop_rule(rule: ConvergenceRule) -> Callable[[int, np.ndarray], tuple[bool, dict | None]]:
    """A fresh ``stop_rule(iteration_done, grad_so_far) -> (stop, check_record)`` for
    ONE image (it remembers that image's earlier checks; make one per image)."""
    return Monitor(rule)


def simulate(rule: ConvergenceRule, maxima: np.ndarray) -> tuple[int, list[Check]]:
    """Apply ``rule`` to a complete stream ``maxima`` [N_b, T, K] as stage 1 would.

    Returns (batches used, the checks). Batch i of a stage-1 run depends only on
    (seed, image, i), so an early-stopped run's maxima are the first ``used`` rows
    of the full run's: this replays the rule on a full run without sampling again.
    """
    m = _as_3d(maxima)
    monitor = Monitor(rule)
    for it in range(1, m.shape[0] + 1):
        stop, _ = monitor(it, m[:it])
        if stop:
            return it, monitor.checks
    return m.shape[0], monitor.checks


def provenance(rule: ConvergenceRule | None, niters_used: int, niters: int,
               checks: Sequence[dict] = ()) -> dict:
    """Keys for a stage-1 file: ``Niters_used`` and, with a rule, ``converge_rule``
    and ``converge_checks`` (JSON strings). Without a rule only ``Niters_used``."""
    out = {"Niters_used": int(niters_used)}
    if rule is not None:
        out["converge_rule"] = json.dumps(rule.to_dict())
        out["converge_checks"] = json.dumps(list(checks))
        out["converge_stopped"] = int(niters_used < niters)
    return out


# --------------------------------------------------------------------------
# The rule of a run's settings (settings.Stage1Settings)
# --------------------------------------------------------------------------
def rule_from_values(converge: float | None, min_iters: int = 100, check_every: int = 25,
                     converge_noise: float = 2.0) -> ConvergenceRule | None:
    """The rule of the --converge, --min_iters, --check_every and --converge_noise values
    (None without --converge); ToolError names a bad flag."""
    if converge is None:
        return None
    return ConvergenceRule(tol=float(converge), min_iters=int(min_iters),
                           check_every=int(check_every), noise_factor=float(converge_noise))


def rule_from_settings(settings) -> ConvergenceRule | None:
    """The rule of a ``settings.Stage1Settings`` (None without ``converge``)."""
    return rule_from_values(settings.converge, settings.min_iters, settings.check_every,
                            settings.converge_noise)
