"""Stage 2's core: score a folder of stage-1 files, no printing, no argv.

:func:`score_folder` (a folder and frozen :class:`Options` in, a
:class:`RunResult` out) fits every file's batch maxima with
:func:`weibull_fit.fit_reverse_weibull` (in a process pool when
``Options.nthreads`` > 1) and reduces the bounds with :mod:`aggregate`;
:func:`file_records` and :func:`write_summary` turn a result into the
``--summary`` JSON and CSV. ``clever.py`` is the command line around it and
re-exports these names.

NumPy/SciPy only: this module never imports TensorFlow, directly or not.
"""
from __future__ import annotations

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
import interval
from aggregate import Reduce
from common import Norm, ToolError
from stage2_files import (BOUND_NORMS, FileError, StageOneFile, find_mat_files,
                          load_stage1_file)
from weibull_fit import MIN_PVALUE, FitResult, FitStatus, Method, Penalty, fit_reverse_weibull

log = logging.getLogger("clever.stage2")


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
    interval: float = 0.0           # --interval LEVEL (the CLI's default 0.9); 0: none


@dataclass(frozen=True)
class NormScore:
    """The CLEVER bound of one file in one bound norm p."""

    norm: Norm                 # bound norm p
    key: str                   # the array fitted (G{q}_max, L{q}_max or H2_max)
    fit: FitResult             # Lipschitz (or curvature) estimate in the dual norm q
    bound_uncapped: float      # the original tool's number
    cap: float | None          # radius cap; None when unknown (no dim)
    bound: float               # min(bound_uncapped, cap)
    # --interval (docs/intervals.md): where a rerun with another seed puts the
    # estimate and the bound; None without an interval (level 0).
    interval: "interval.LipschitzInterval | None" = None
    bound_lo: float = math.nan             # capped, as ``bound``
    bound_hi: float = math.nan
    bound_uncapped_lo: float = math.nan    # as ``bound_uncapped``
    bound_uncapped_hi: float = math.nan


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
    # --interval: the sampling interval of each value (interval.summary_interval:
    # the seed of these same files, not the choice of images); None without.
    lo: Mapping[Norm, float] | None = None
    hi: Mapping[Norm, float] | None = None


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

    def reported_interval(self, score: NormScore) -> tuple[float, float]:
        """(lo, hi) of the printed bound (see :func:`reported_interval`)."""
        return reported_interval(score, self.options.radius_cap)


def reported_bound(score: NormScore, radius_cap: bool) -> float:
    """``score.bound`` (capped) or, for --no_radius_cap, ``score.bound_uncapped``."""
    return aggregate.reported(score.bound, score.bound_uncapped, radius_cap)


def reported_interval(score: NormScore, radius_cap: bool) -> tuple[float, float]:
    """(lo, hi) of the reported bound: capped, or uncapped for --no_radius_cap."""
    if radius_cap:
        return score.bound_lo, score.bound_hi
    return score.bound_uncapped_lo, score.bound_uncapped_hi


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
    level: float = 0.0    # --interval; 0: no subset fits


def _run_task(task: _FitTask) -> tuple[int, Norm, FitResult | None,
                                       interval.LipschitzInterval | None, str, str]:
    """Fit one array, its interval's subsets (and plot it); top level so a
    process pool can pickle it.

    Returns (index, norm, fit or None, interval or None, fit error, plot
    error): an unexpected SciPy failure costs its file, not the run.
    """
    iv = None
    try:
        fit = fit_reverse_weibull(task.samples, task.method, task.shape_reg, task.penalize)
        if task.level > 0:
            iv = interval.lipschitz_interval(task.samples, fit, task.level,
                                             method=task.method, shape_reg=task.shape_reg,
                                             penalize=task.penalize)
    except Exception as err:  # noqa: BLE001 - reported per file by the caller
        return task.index, task.norm, None, None, f"{type(err).__name__}: {err}", ""
    plot_error = ""
    if task.plot_path:
        try:
            import stage2_plots

            stage2_plots.plot_fit(task.samples, fit, task.plot_path, task.plot_label)
        except Exception as err:  # noqa: BLE001 - a failed figure must not lose the fit
            plot_error = f"{type(err).__name__}: {err}"
    return task.index, task.norm, fit, iv, "", plot_error


def _plot_name(folder: str, path: str, norm: Norm, use_slope: bool) -> str:
    """``<relative path with / as __>_<L1|L2|Li>[_slope].png`` (unique per fit)."""
    rel = os.path.relpath(path, folder) if folder else os.path.basename(path)
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

    with_interval = options.interval > 0

    def ends(fs: FileScore, end: int) -> dict[Norm, float]:
        return {n: reported_interval(fs.scores[n], options.radius_cap)[end] for n in norms}

    def summary(rows: Sequence[tuple[int, dict, dict, dict]], how_: Reduce):
        """(lo, hi) per norm of the mean/min of rows (image id, values, lo, hi)."""
        if not with_interval:
            return {}
        lo, hi = {}, {}
        for n in norms:
            lo[n], hi[n] = interval.summary_interval(
                [r[1][n] for r in rows], [r[2][n] for r in rows], [r[3][n] for r in rows],
                how_.value, groups=[r[0] for r in rows])
        return {"lo": lo, "hi": hi}

    if options.untargeted:
        images = aggregate.per_image_minimum((fs.file.img_id, values(fs)) for fs in files)
        out, rows = [], []
        by_image = aggregate.group((fs.file.img_id, fs) for fs in files)
        for m in images:
            mine = [(m.image, values(fs), ends(fs, 0), ends(fs, 1)) for fs in by_image[m.image]]
            extra = summary(mine, Reduce.MIN)
            out.append(Aggregate("L1", "untargeted", m.values, image=m.image,
                                 n_classes=m.n_classes, **extra))
            rows.append((m.image, m.values, extra.get("lo"), extra.get("hi")))
        if images:
            out.append(Aggregate("L0", "untargeted",
                                 aggregate.reduce_fields([m.values for m in images], how),
                                 **summary(rows, how)))
        return out
    per_info = aggregate.group((fs.file.info, fs) for fs in files)
    return [Aggregate("L0", info,
                      aggregate.reduce_fields([values(fs) for fs in per_info[info]], how),
                      **summary([(fs.file.img_id, values(fs), ends(fs, 0), ends(fs, 1))
                                 for fs in per_info[info]], how))
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
    return score_files(loaded, options, folder=folder, errors=errors)


def score_files(loaded: Sequence[StageOneFile], options: Options = Options(), *,
                folder: str = "", errors: Sequence[tuple[str, str]] = ()) -> RunResult:
    """:func:`score_folder` on files already read (from disk or from memory).

    ``loaded``: :class:`StageOneFile` values (``stage2_files.load_stage1_file``
    or ``stage2_files.stage1_file_from_mapping``); ``folder``: where plot names
    are made relative to; ``errors``: (path, message) pairs of files that could
    not be read, reported with the fits' errors. Same selection, fits and
    aggregation as a folder, so a result from memory equals the one from its
    files.
    """
    method = Method(options.method)
    try:
        level = interval.check_level(options.interval)
    except ValueError as err:
        raise ToolError(f"--interval {options.interval}: {err}") from None
    errors = list(errors)
    files, order, skipped = _select(list(loaded), options, errors)
    if skipped:
        log.info("skipped %d untargeted (class<j>) files; use --untargeted for them",
                 len(skipped))
    if not files and not errors:
        raise ToolError(f"{folder or 'the files'}: only untargeted (info class<j>) files; "
                        "use --untargeted")

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
                                  Penalty(options.penalize), plot_path, label, level))
    fits: dict[tuple[int, Norm], FitResult | str] = {}
    intervals: dict[tuple[int, Norm], interval.LipschitzInterval | None] = {}
    for index, norm, fit, iv, fit_error, plot_error in _execute(tasks, options.nthreads,
                                                                options.progress):
        fits[(index, norm)] = fit if fit is not None else fit_error
        intervals[(index, norm)] = iv
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
            iv = intervals[(index, norm)]
            ends = {}
            if iv is not None:
                lo, hi = interval.bound_ends(f.order, f.g_x0, iv.lo, iv.hi, b.cap, f.grad_norm)
                ulo, uhi = interval.bound_ends(f.order, f.g_x0, iv.lo, iv.hi, None,
                                               f.grad_norm)
                ends = dict(interval=iv, bound_lo=lo, bound_hi=hi, bound_uncapped_lo=ulo,
                            bound_uncapped_hi=uhi)
            scores[norm] = NormScore(norm, f.keys[norm], fit, b.uncapped, b.cap, b.bound,
                                     **ends)
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


#: Fields of a norm's record with --interval (docs/intervals.md); none without.
_INTERVAL_FIELDS = ("bound_lo", "bound_hi", "bound_uncapped_lo", "bound_uncapped_hi",
                    "estimate_lo", "estimate_hi")


def _norm_record(s: NormScore) -> dict:
    record = {"key": s.key, "estimate": s.fit.estimate, "shape": s.fit.shape,
              "loc": s.fit.loc, "scale": s.fit.scale, "ks": s.fit.ks, "pval": s.fit.pval,
              "bound": s.bound, "bound_uncapped": s.bound_uncapped, "cap": s.cap,
              "fallback": s.fit.fallback, "status": s.fit.status.value, "n_used": s.fit.n_used,
              "n_dropped": s.fit.n_dropped}
    if s.interval is not None:
        record.update(bound_lo=s.bound_lo, bound_hi=s.bound_hi,
                      bound_uncapped_lo=s.bound_uncapped_lo,
                      bound_uncapped_hi=s.bound_uncapped_hi,
                      estimate_lo=s.interval.lo, estimate_hi=s.interval.hi)
    return record


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
    if agg.lo is not None:
        for n in agg.values:
            record[f"clever_{n.label}_lo"] = agg.lo[n]
            record[f"clever_{n.label}_hi"] = agg.hi[n]
    return record


def write_summary(result: RunResult, path: str, args: Mapping | None = None) -> str:
    """Write the run's JSON summary at ``path`` and a CSV of its file records next to it.

    JSON: ``provenance`` (:func:`common.provenance`), ``options``, ``records``
    (one per file: ids, labels, info, order, nsamps, niters, g_x0, sampling
    ball, data range ([lo, hi], null: unbounded; "LO HI" or none in the CSV),
    per bound norm the fit and the bound capped and uncapped, and the file's
    own provenance keys), ``aggregates`` (the numbers of the
    ``[STATS]`` lines) and ``errors``. With ``options.interval`` (> 0) every
    norm's record also has ``bound_lo``, ``bound_hi``, ``bound_uncapped_lo``,
    ``bound_uncapped_hi``, ``estimate_lo`` and ``estimate_hi`` (CSV columns
    ``L1_bound_lo``, ...), every aggregate ``clever_<norm>_lo`` and ``_hi``, and
    ``interval`` says the level, the method and what it covers
    (docs/intervals.md). Non-finite numbers are written as null.
    Returns the CSV path.
    """
    options = result.options
    summary = {
        "provenance": common.provenance(args),
        # --interval 0 leaves the summary as it was before the option existed.
        "options": {k: (v.value if isinstance(v, enum.Enum) else v)
                    for k, v in vars(options).items()
                    if not (k == "interval" and v == 0)},
        "order": result.order,
        "reported_bounds": "capped" if options.radius_cap else "uncapped",
        "records": file_records(result),
        "aggregates": [_aggregate_record(a) for a in result.aggregates],
        **({"interval": interval.describe(options.interval)} if options.interval > 0 else {}),
        "errors": [{"path": p, "error": m} for p, m in result.errors],
    }
    common.write_json(path, json_safe(summary))

    stem, _ = os.path.splitext(path)
    csv_path = stem + ".csv"
    file_fields = ["path", "id", "true_label", "target_label", "info", "order", "nsamps",
                   "niters", "niters_used", "g_x0", "g_x0_grad_2_norm", "radius",
                   "sample_norm", "dim", "data_range"]
    norm_fields = _NORM_FIELDS + (_INTERVAL_FIELDS if options.interval > 0 else ())
    header = file_fields + [f"{n.label}_{k}" for n in BOUND_NORMS for k in norm_fields]
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
            row += [norm_rec.get(k, "") for k in norm_fields]
        writer.writerow(["" if v is None else v for v in row])
    common.atomic_write_text(csv_path, buf.getvalue())
    return csv_path

