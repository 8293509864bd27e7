#!/usr/bin/env python3
"""How far ``--penalize shape`` moves stage 2 from the original's fit, on real files.

For every stage-1 file under a folder and every norm, fits the maxima with
the original's penalty (SciPy's theta[2], the scale of the rescaled fit:
``--penalize scale``, the default) and with the penalty on the shape c
(``--penalize shape``), and prints the range of fitted shapes under each and
the ratio of the Lipschitz estimates (shape / scale) over all fits:

    python bench/compare_penalty.py tests/data/original-stage2/targeted
    python bench/compare_penalty.py lipschitz_mat/demo/digits_normal
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from stage2_files import find_mat_files, load_stage1_file  # noqa: E402
from weibull_fit import FitStatus, fit_reverse_weibull  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder of stage-1 .mat files (searched recursively)")
    p.add_argument("--shape_reg", type=float, default=0.01)
    return p.parse_args(argv)


def main(args) -> int:
    shapes = {"scale": [], "shape": []}
    ratios = []
    for path in find_mat_files(args.folder):
        f = load_stage1_file(path)
        for samples in f.maxima.values():
            a = fit_reverse_weibull(samples, shape_reg=args.shape_reg, penalize="scale")
            b = fit_reverse_weibull(samples, shape_reg=args.shape_reg, penalize="shape")
            if a.status is FitStatus.FIT:
                shapes["scale"].append(a.shape)
            if b.status is FitStatus.FIT:
                shapes["shape"].append(b.shape)
            if a.estimate > 0:
                ratios.append(b.estimate / a.estimate)
    ratios = np.asarray(ratios)
    print(f"[PENALTY] folder = {args.folder}, fits = {ratios.size}")
    for name, values in shapes.items():
        v = np.asarray(values)
        print(f"[PENALTY] penalize = {name}: fitted shapes {np.min(v):.3g} to {np.max(v):.3g} "
              f"(median {np.median(v):.3g})")
    print(f"[PENALTY] Lipschitz estimate shape / scale: min {ratios.min():.3f}, median "
          f"{np.median(ratios):.3f}, max {ratios.max():.3f}; below 0.95 in "
          f"{100 * np.mean(ratios < 0.95):.0f}% of fits")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
