#!/usr/bin/env python3
"""Stage 2 of the CLEVER toolkit: reverse Weibull fits and CLEVER scores.

Reads the ``.mat`` files of stage 1 (this toolkit's or the original tool's,
docs/format.md), estimates the local Lipschitz constant of every file and norm
by fitting a reverse Weibull distribution to the batch maxima of gradient norms
(docs/format.md) and prints the CLEVER statistics in the original tool's format.

NumPy/SciPy only: this module never imports TensorFlow, directly or not.

Layers, from pure to impure:

* :mod:`weibull_fit` (array in, :class:`FitResult` out) and :mod:`aggregate`
  (the bound with its radius cap, the per-info mean or minimum, the per-image
  minimum; :func:`clever_bound`, :func:`second_order_bound` and :func:`cap_for`
  are re-exported here): the method.
* :func:`stage2_files.load_stage1_file` (one file in, :class:`StageOneFile`
  out) and :func:`score_folder` (a folder in, :class:`RunResult` out, no printing):
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
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

import aggregate
import common
from aggregate import Reduce, cap_for, clever_bound, second_order_bound  # noqa: F401
from common import Norm, ToolError
from stage2_files import (BOUND_NORMS, FileError, StageOneFile,  # noqa: F401
                          find_mat_files, is_untargeted_info, load_stage1_file)
from weibull_fit import (C_INIT, MIN_PVALUE, FitResult, FitStatus, FitTrial, Method,  # noqa: F401
                         Penalty, fit_reverse_weibull)

log = logging.getLogger("clever.stage2")

PROG = "clever.py"

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
    penalize: Penalty = Penalty.SCALE  # the original's theta[2]; --penalize shape for c
    match: str = ""                 # --match: glob on the file base names
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
    n_classes: int | None = None  # L1 lines: aggregate.n_classes (files + the true class)


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
    return aggregate.reported(score.bound, score.bound_uncapped, radius_cap)


@dataclass(frozen=True)
class _FitTask:
    index: int            # file position in the sorted list
    norm: Norm
    samples: np.ndarray
    method: Method
    shape_reg: float
    penalize: Penalty
    plot_path: str        # "" for no plot
    plot_label: str


def _run_task(task: _FitTask) -> tuple[int, Norm, FitResult | None, str, str]:
    """Fit one array (and plot it); top level so a process pool can pickle it.

    Returns (index, norm, fit or None, fit error, plot error): an unexpected
    SciPy failure costs its file, not the run.
    """
    try:
        fit = fit_reverse_weibull(task.samples, task.method, task.shape_reg, task.penalize)
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


def _aggregate(files: Sequence[FileScore], options: Options, order: int) -> list[Aggregate]:
    """The ``[STATS]`` lines: per info (targeted) or per image, then overall (untargeted)."""
    norms = BOUND_NORMS if order == 1 else (Norm.L2,)
    how = Reduce(options.reduce)

    def values(fs: FileScore) -> dict[Norm, float]:
        return {n: reported_bound(fs.scores[n], options.radius_cap) for n in norms}

    if options.untargeted:
        images = aggregate.per_image_minimum((fs.file.img_id, values(fs)) for fs in files)
        out = [Aggregate("L1", "untargeted", m.values, image=m.image, n_classes=m.n_classes)
               for m in images]
        if images:
            out.append(Aggregate("L0", "untargeted",
                                 aggregate.reduce_fields([m.values for m in images], how)))
        return out
    per_info = aggregate.group((fs.file.info, values(fs)) for fs in files)
    return [Aggregate("L0", info, aggregate.reduce_fields(per_info[info], how))
            for info in sorted(per_info)]


def _select(loaded: list[StageOneFile], options: Options,
            errors: list[tuple[str, str]]) -> tuple[list[StageOneFile], int, list[str]]:
    """Keep the files of this mode and order, the first --num_images images.

    Untargeted, as the original: every file of an image counts, whatever its
    info (class<j> files, or the top2/random/least files of run.sh's ``all``).
    Targeted: the class<j> files of an untargeted run are left out.
    """
    wanted = [f for f in loaded if options.untargeted or not f.untargeted]
    skipped = [f.path for f in loaded if not options.untargeted and f.untargeted]
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
    paths = find_mat_files(folder, options.match)
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
        log.info("skipped %d untargeted (class<j>) files; use --untargeted for them",
                 len(skipped))
    if not files and not errors:
        raise ToolError(f"{folder}: only untargeted (info class<j>) files; use --untargeted")

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
                                  Penalty(options.penalize), plot_path, label))
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
            b = aggregate.file_bound(f.order, f.g_x0, fit.estimate, f.radius, f.sample_norm,
                                     norm, f.dim, f.grad_norm)
            if b.cap is None:
                log.debug("%s: input dimension unknown: the %s bound (samples in an %s ball) "
                          "is not capped", f.path, norm.label, f.sample_norm.label)
            scores[norm] = NormScore(norm, f.keys[norm], fit, b.uncapped, b.cap, b.bound)
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
# Printed lines (the format of docs/format.md)
# --------------------------------------------------------------------------
def trial_lines(fit: FitResult) -> list[str]:
    """The original's ``[DEBUG][L2]`` lines: the fit from each initial shape."""
    return [f"[DEBUG][L2] c_init = {t.c_init:5.5g}, fitted c = {t.c:6.2f}, loc = {t.loc:7.2f}, "
            f"scale = {t.scale:7.2f}, ks = {t.ks:4.2f}, pVal = {t.pval:4.2f}, "
            f"max = {fit.maximum:7.2f}" for t in fit.trials]


#: The original fitted G1, G2, Gi in this order, i.e. the bounds Li, L2, L1.
_FIT_ORDER: tuple[Norm, ...] = (Norm.LINF, Norm.L2, Norm.L1)


def debug_lines(result: RunResult, trials: bool = False) -> list[str]:
    """``[DEBUG][L1]`` lines: one per file and bound norm, in the original's order.

    ``trials``: precede each file's lines by its ``[DEBUG][L2]`` lines (``-v``),
    in the original's fitting order. Method maxsamp ends a line at ``bnd``, as
    the original; g_x0 is printed as the original printed the stored value.
    """
    lines = []
    maxsamp = result.options.method is Method.MAXSAMP
    for fs in result.files:
        f = fs.file
        if trials:
            for norm in _FIT_ORDER:
                if norm in fs.scores:
                    lines.extend(trial_lines(fs.scores[norm].fit))
        for norm in BOUND_NORMS:
            if norm not in fs.scores:
                continue
            s = fs.scores[norm]
            line = (f"[DEBUG][L1] id = {f.img_id}, true_label = {f.true_label}, "
                    f"target_label = {f.target_label}, info = {f.info}, nsamps = {f.nsamps}, "
                    f"niters = {f.niters}, bnd_norm = {norm.value}, "
                    f"bnd = {result.reported(s):.5g}")
            if not maxsamp:
                line += (f", ks = {s.fit.ks:.5g}, pVal = {s.fit.pval:.5g}, "
                         f"shape = {s.fit.shape:.5g}, loc = {s.fit.loc:.5g}, "
                         f"scale = {s.fit.scale:.5g}, g_x0 = {f.g_x0_text or repr(f.g_x0)}")
            lines.append(line)
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
def json_safe(value):
    """Strict JSON has no NaN/Infinity: write null (the status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
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
            "nsamps": f.nsamps, "niters": f.niters, "niters_used": f.niters_used,
            "g_x0": f.g_x0,
            "g_x0_grad_2_norm": None if f.order == 1 else f.grad_norm,
            "radius": f.radius, "sample_norm": f.sample_norm.label.lower(), "dim": f.dim,
            "data_range": None if f.data_range is None else list(f.data_range),
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
    ball, data range ([lo, hi], null: unbounded; "LO HI" or none in the CSV),
    per bound norm the fit and the bound capped and uncapped, and the file's
    own provenance keys), ``aggregates`` (the numbers of the
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
    common.write_json(path, json_safe(summary))

    stem, _ = os.path.splitext(path)
    csv_path = stem + ".csv"
    file_fields = ["path", "id", "true_label", "target_label", "info", "order", "nsamps",
                   "niters", "niters_used", "g_x0", "g_x0_grad_2_norm", "radius",
                   "sample_norm", "dim", "data_range"]
    header = file_fields + [f"{n.label}_{k}" for n in BOUND_NORMS for k in _NORM_FIELDS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for rec in file_records(result):
        row = [rec[k] for k in file_fields]
        # The range as --data_range takes it: "LO HI", or none.
        lohi = rec["data_range"]
        row[file_fields.index("data_range")] = "none" if lohi is None else " ".join(
            np.format_float_positional(v, trim="-") for v in lohi)
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
                        help="weight of the --method mle_reg penalty shape_reg * p^2 on the "
                             "parameter --penalize")
    parser.add_argument("--penalize", choices=[p.value for p in Penalty], default="scale",
                        help="parameter of the rescaled fit that mle_reg penalises: scale "
                             "(the original tool's theta[2], its numbers and the paper's) or "
                             "shape (the shape c, as the original's comment intended; lower "
                             "Lipschitz estimates)")
    parser.add_argument("--match", default="", metavar="GLOB",
                        help="only files whose base name matches this glob, e.g. "
                             "'1024_500_*_relu_order1.mat' (empty: all)")
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
                        help="more diagnostics on stderr and the original's [DEBUG][L2] "
                             "lines (the fit from each initial shape) on stdout; -vv for debug")
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
                   penalize=Penalty(args.penalize), match=args.match,
                   num_samples=args.num_samples, num_images=args.num_images,
                   user_type=args.user_type, use_slope=args.use_slope,
                   radius_cap=not args.no_radius_cap, nthreads=args.nthreads,
                   plot_dir=args.plot_dir, progress=True)


def main(args: argparse.Namespace) -> int:
    """Score ``args.data_folder``; print the statistics; 1 if any file failed."""
    common.setup_logging(args.verbose)
    result = score_folder(args.data_folder, options_from_args(args))
    for line in debug_lines(result, trials=args.verbose > 0) + stats_lines(result):
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
