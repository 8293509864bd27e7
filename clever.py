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
  out) and :func:`stage2.score_folder` (a folder in, :class:`RunResult` out, no
  printing; re-exported here with the rest of :mod:`stage2`): what stage-1
  tests and notebooks call in-process. :mod:`stage2_plots` draws the figures.
* :func:`debug_lines`, :func:`stats_lines` and :func:`main`: the CLI.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import common
from aggregate import Reduce, cap_for, clever_bound, second_order_bound  # noqa: F401
from common import Norm, ToolError  # noqa: F401
from api import (CleverResult, NormResult, clever_batch, clever_t, clever_u,  # noqa: F401
                 score_arrays, score_maxima)
from stage2 import (Aggregate, FileScore, NormScore, Options, RunResult,  # noqa: F401
                    file_records, json_safe, reported_bound, reported_interval,
                    score_files, score_folder, write_summary)
from stage2_files import (BOUND_NORMS, FileError, StageOneFile,  # noqa: F401
                          find_mat_files, is_untargeted_info, load_stage1_file)
from stage2_plots import plot_fit, plot_summary  # noqa: F401
from weibull_fit import (C_INIT, MIN_PVALUE, FitResult, FitStatus, FitTrial, Method,  # noqa: F401
                         Penalty, fit_reverse_weibull)

log = logging.getLogger("clever.stage2")

PROG = "clever.py"

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


def debug_lines(result: RunResult, trials: bool = False, intervals: bool = False) -> list[str]:
    """``[DEBUG][L1]`` lines: one per file and bound norm, in the original's order.

    ``trials``: precede each file's lines by its ``[DEBUG][L2]`` lines (``-v``),
    in the original's fitting order. Method maxsamp ends a line at ``bnd``, as
    the original; g_x0 is printed as the original printed the stored value.
    ``intervals``: follow each file's lines by its ``[INTERVAL][FILE]`` lines
    (``-v`` with ``--interval``; none when the run has no interval).
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
        if intervals and result.options.interval > 0:
            lines.extend(interval_file_lines(result, fs))
    return lines


def _g(value: float) -> str:
    return f"{value:.5g}"


def interval_file_lines(result: RunResult, fs: FileScore) -> list[str]:
    """``[INTERVAL][FILE]`` lines of one file: per bound norm the reported bound,
    its interval at the run's level, and the Lipschitz (or curvature) estimate's."""
    f = fs.file
    lines = []
    for norm in BOUND_NORMS:
        if norm not in fs.scores:
            continue
        s = fs.scores[norm]
        lo, hi = reported_interval(s, result.options.radius_cap)
        iv = s.interval
        lines.append(f"[INTERVAL][FILE] id = {f.img_id}, true_label = {f.true_label}, "
                     f"target_label = {f.target_label}, info = {f.info}, "
                     f"bnd_norm = {norm.value}, level = {result.options.interval:g}, "
                     f"bnd = {_g(result.reported(s))}, bnd_lo = {_g(lo)}, bnd_hi = {_g(hi)}, "
                     f"estimate = {_g(s.fit.estimate)}, estimate_lo = {_g(iv.lo)}, "
                     f"estimate_hi = {_g(iv.hi)}")
    return lines


def interval_lines(result: RunResult) -> list[str]:
    """``[INTERVAL][L1]`` / ``[INTERVAL][L0]`` lines: each ``[STATS]`` line's
    values with their intervals (``covers = seed``: the sampling of stage 1 for
    these files, not the choice of images); none without ``--interval``."""
    if result.options.interval <= 0:
        return []
    head = f"level = {result.options.interval:g}, covers = seed"
    lines = []
    for agg in result.aggregates:
        if agg.lo is None:
            continue
        prefix = "clever" if agg.level == "L1" else f"{agg.info}_clever"
        values = ", ".join(f"{prefix}_{n.label} = {_g(v)}, {prefix}_{n.label}_lo = "
                           f"{_g(agg.lo[n])}, {prefix}_{n.label}_hi = {_g(agg.hi[n])}"
                           for n, v in agg.values.items())
        if agg.level == "L1":
            lines.append(f"[INTERVAL][L1] image = {agg.image:3d}, {head}, {values}")
        else:
            lines.append(f"[INTERVAL][L0] info = {agg.info}, {head}, {values}")
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
    parser.add_argument("--interval", type=float, default=0.9, metavar="LEVEL",
                        help="give every bound the range in which a rerun of stage 1 with "
                             "another seed would put it, at this nominal level (0: none; "
                             "docs/intervals.md): in the --summary records and on "
                             "[INTERVAL] lines (per file with -v)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics on stderr and the original's [DEBUG][L2] "
                             "lines (the fit from each initial shape) on stdout; -vv for debug")
    args = parser.parse_args(list(argv))
    common.check_positive("--num_samples", args.num_samples, allow_zero=True)
    common.check_positive("--num_images", args.num_images, allow_zero=True)
    common.check_positive("--shape_reg", args.shape_reg, allow_zero=True)
    common.check_positive("--nthreads", args.nthreads, allow_zero=True)
    if not 0.0 <= args.interval < 1.0:
        raise ToolError(f"--interval {args.interval}: the level must be in [0, 1) "
                        "(e.g. 0.9; 0: no interval)")
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
                   plot_dir=args.plot_dir, progress=True, interval=args.interval)


def main(args: argparse.Namespace) -> int:
    """Score ``args.data_folder``; print the statistics; 1 if any file failed."""
    common.setup_logging(args.verbose)
    result = score_folder(args.data_folder, options_from_args(args))
    for line in (debug_lines(result, trials=args.verbose > 0, intervals=args.verbose > 0)
                 + stats_lines(result) + interval_lines(result)):
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

