"""The README's CLEVER / CW ratios and radius comparison, from a run's own files.

From ``records.csv`` of ``reproduce_tables.py`` (one row per image and
target): per model, the median of CLEVER L2 / CW L2 over the targeted pairs
(least, random, top-2) with a CW distortion, how many pairs have CLEVER above
CW and the range of their ratios. With ``--stage1 A --stage1_ref B`` (two
stage-1 folders of the same model, images and targets at two radii, e.g.
R = 5 and R = 3): the median over matching files of the ratio of the fitted
L2 Lipschitz estimates (the maximum gradient norm of the reverse Weibull fit).

    .venv/bin/python bench/readme_ratios.py results/digits/records.csv
    .venv/bin/python bench/readme_ratios.py --stage1 r5/digits_brelu --stage1_ref r3/digits_brelu
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from common import Norm, ToolError, run_cli  # noqa: E402

TARGETED = ("least", "random", "top2")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="?", default="", help="records.csv of reproduce_tables.py")
    p.add_argument("--stage1", default="", help="stage-1 folder (e.g. at R = 5)")
    p.add_argument("--stage1_ref", default="", help="the same run at the reference radius")
    args = p.parse_args(argv)
    if not args.records and not args.stage1:
        raise ToolError("give a records.csv and/or --stage1 with --stage1_ref")
    if bool(args.stage1) != bool(args.stage1_ref):
        raise ToolError("--stage1 and --stage1_ref go together")
    return args


def ratio_lines(path: str) -> list[str]:
    import pandas as pd

    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such file")
    df = pd.read_csv(path)
    for col in ("model", "kind", "clever_L2", "cw_l2_L2"):
        if col not in df.columns:
            raise ToolError(f"{path}: no column {col!r} (a records.csv of reproduce_tables.py?)")
    lines = []
    for model, sub in df[df["kind"].isin(TARGETED)].groupby("model", sort=False):
        cw = sub["cw_l2_L2"].to_numpy(float)
        cl = sub["clever_L2"].to_numpy(float)
        ok = np.isfinite(cw) & (cw > 0) & np.isfinite(cl)
        ratio = cl[ok] / cw[ok]
        above = ratio[ratio > 1]
        kinds = sub["kind"].to_numpy()[ok][ratio > 1]
        rng = f"{above.min():.2f} to {above.max():.2f}" if above.size else "-"
        lines.append(f"{model}: {ok.sum()} targeted pairs, median CLEVER L2 / CW L2 "
                     f"{np.median(ratio):.3f}; CLEVER above CW on {above.size} "
                     f"(ratios {rng}; kinds {', '.join(sorted(kinds)) or '-'})")
    return lines


def radius_line(folder: str, ref: str) -> str:
    import clever

    opts = clever.Options(nthreads=1)
    a = {os.path.basename(fs.file.path): fs for fs in clever.score_folder(folder, opts).files}
    b = {os.path.basename(fs.file.path): fs for fs in clever.score_folder(ref, opts).files}
    common_names = sorted(set(a) & set(b))
    if not common_names:
        raise ToolError(f"{folder} and {ref} share no file names")
    ratios = np.array([a[n].scores[Norm.L2].fit.estimate / b[n].scores[Norm.L2].fit.estimate
                       for n in common_names])
    return (f"fitted L2 Lipschitz estimate {folder} / {ref}: median {np.median(ratios):.2f} "
            f"over {len(ratios)} files (range {ratios.min():.2f} to {ratios.max():.2f})")


def main(args) -> int:
    if args.records:
        for line in ratio_lines(args.records):
            print(line)
    if args.stage1:
        print(radius_line(args.stage1, args.stage1_ref))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
