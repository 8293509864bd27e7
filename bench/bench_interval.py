#!/usr/bin/env python3
"""Calibration of stage 2's intervals (``clever.py --interval``) against reruns with another seed.

On the digits ``normal`` (7-layer ReLU CNN) and ``2-layer`` (softplus MLP)
models, 10 images, targets top2 and least (the same for every seed: neither
depends on the seed), N_s 128, N_b 500, R 5: stage 1 with each seed of
``--seeds`` (pairs, e.g. 1215,1216 and 1217,1218); stage 2
(``stage2.score_folder`` with ``Options(interval=LEVEL, num_samples=N_b)``)
on the first N_b 200 and all 500 maxima of every file (batch i depends only
on (seed, image, i), so the first 200 batches of a 500-batch run are a
200-batch run). Prints, per model, N_b and seed pair, over every (image,
target, bound norm):

* coverage: the fraction whose bound from the second seed lies in the first
  seed's interval, the reverse, and both directions together;
* the median relative width (hi - lo) / bound;

then the pooled coverage, ``PASS`` when every pooled-over-directions
coverage of a (model, N_b, pair) is in [0.85, 0.95] and, with ``--cost``,
stage 2's time with the interval over its time without (same files,
``--nthreads`` processes, interleaved rounds, minimum kept).

The default method (``boot10``: interval.SCHEME "bootstrap", 10 refits) is
computed with ``--methods``, which also prints the coverage of the measured
alternatives (``sub5:r``: 5 interleaved subsets with the law K^(-r)), from
cached fits; ``--numimg_normal`` and ``--Niters2`` shrink the slow normal
model's stage 1.

Stage-1 runs are cached under --dir (default /tmp/interval_bench).

    .venv/bin/python bench/bench_interval.py [--seeds 1215,1216,1217,1218] [--cost]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PY = sys.executable
MODEL_DIRNAME = {"normal": "digits_normal", "2-layer": "digits_2-layer"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/interval_bench", help="cache of models and runs")
    p.add_argument("--models", default="normal,2-layer")
    p.add_argument("--numimg", type=int, default=10)
    p.add_argument("--numimg_normal", type=int, default=0,
                   help="images of the normal model (0: --numimg); its stage 1 is the slow one")
    p.add_argument("--Nsamps", type=int, default=128)
    p.add_argument("--Niters", type=int, default=500)
    p.add_argument("--Niters2", type=int, default=0,
                   help="N_b of the normal model's runs after the first seed pair (0: --Niters)")
    p.add_argument("--nbs", default="200,500", help="N_b values scored (first N_b maxima)")
    p.add_argument("--radius", type=float, default=5.0)
    p.add_argument("--seeds", default="1215,1216", help="seed pairs, e.g. 1215,1216,1217,1218")
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--nthreads", type=int, default=2, help="stage 2's processes")
    p.add_argument("--stage1_only", action="store_true", help="run stage 1 and stop")
    p.add_argument("--no_run", action="store_true", help="run no stage 1 (cached files only)")
    p.add_argument("--cost", action="store_true",
                   help="also time stage 2 with and without the interval")
    p.add_argument("--methods", action="store_true", help="also compare candidate methods")
    return p.parse_args(argv)


def train(args) -> str:
    models_dir = os.path.join(args.dir, "models")
    if not all(os.path.exists(os.path.join(models_dir, n))
               for n in ("digits.keras", "digits_2layer.keras")):
        subprocess.run([PY, os.path.join(ROOT, "train_models.py"), "--dataset", "digits",
                        "--models", "normal,2-layer", "--models_dir", models_dir], check=True)
    return models_dir


def run_size(args, model: str, seed: int) -> tuple[int, int]:
    """(images, N_b) of one model's stage-1 run with ``seed``."""
    seeds = [int(s) for s in args.seeds.split(",")]
    if model != "normal":
        return args.numimg, args.Niters
    later = seeds.index(seed) >= 2 and args.Niters2
    return args.numimg_normal or args.numimg, args.Niters2 if later else args.Niters


def stage1(args, model: str, seed: int) -> str:
    """One collect_gradients.py run (kept when its files are there); its model folder."""
    save = os.path.join(args.dir, f"s{seed}")
    folder = os.path.join(save, MODEL_DIRNAME[model])
    numimg, niters = run_size(args, model, seed)
    if args.no_run or len(glob.glob(os.path.join(folder, "*.mat"))) >= 2 * numimg:
        return folder
    cmd = [PY, os.path.join(ROOT, "collect_gradients.py"), "-d", "digits", "-m", model,
           "--models_dir", train(args), "-N", str(args.Nsamps), "-i", str(niters),
           "--radius", repr(args.radius), "--seed", str(seed), "-s", save, "-q",
           "--no_progress", "-n", str(numimg), "--targets", "top2,least"]
    print("#", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder



# --------------------------------------------------------------------------
# The fits of every column, cached: full fit, K subsets, parametric bootstrap
# --------------------------------------------------------------------------
def _column_task(task):
    """(key, record) for one (file, norm, N_b): the fit, the subset and bootstrap estimates."""
    import aggregate
    import interval
    from weibull_fit import fit_reverse_weibull

    key, samples, order, g_x0, cap, grad_norm, methods = task
    fit = fit_reverse_weibull(samples)
    rec = {"estimate": fit.estimate, "shape": fit.shape, "status": fit.status.value,
           "g_x0": g_x0, "cap": cap, "order": order, "grad_norm": grad_norm,
           "bound": aggregate.capped(aggregate.clever_bound(g_x0, fit.estimate), cap)}
    t0 = time.process_time()
    rec["sub5"] = interval.subset_estimates(samples, 5, c_init=(fit.shape,)).tolist() \
        if fit.status.value == "fit" else []
    rec["t_sub5"] = time.process_time() - t0
    if True:  # the default method's refits (``methods`` only widens what is printed)
        t0 = time.process_time()
        rec["boot10"] = interval.bootstrap_estimates(samples, fit, 10).tolist()
        rec["t_boot10"] = time.process_time() - t0
    return key, rec


def column_fits(args, folder: str, nb: int, cache_path: str) -> dict:
    """{(image, target, norm label): record} of one stage-1 folder at N_b ``nb``."""
    import concurrent.futures

    import aggregate
    from stage2_files import find_mat_files, load_stage1_file

    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as fh:
            cache = json.load(fh)
    tasks = []
    for path in find_mat_files(folder, ""):
        f = load_stage1_file(path, num_samples=nb)
        for norm, samples in f.maxima.items():
            key = f"{f.img_id}|{f.target_label}|{norm.label}"
            if key in cache and "boot10" in cache[key]:
                continue
            cap = aggregate.cap_for(f.radius, f.sample_norm, norm, f.dim)
            tasks.append((key, np.asarray(samples), f.order, float(f.g_x0), cap,
                          f.grad_norm, args.methods))
    if tasks:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.nthreads) as pool:
            for key, rec in pool.map(_column_task, tasks, chunksize=2):
                cache[key] = rec
        import common

        common.atomic_write_text(cache_path, json.dumps(cache))
    return {tuple(k.split("|")): v for k, v in cache.items()}


# --------------------------------------------------------------------------
# Candidate methods: the interval of one record
# --------------------------------------------------------------------------
def _half(rec: dict, method: str, level: float) -> float:
    import interval
    from scipy.stats import t as student_t

    if rec["status"] in ("degenerate", "all_zero"):
        return 0.0
    if method.startswith("sub5"):       # sub5:r or sub5all:r
        name, rate = method.split(":")
        return interval.half_width(np.array(rec[name]), level, float(rate)) \
            if rec[name] else float("nan")
    if method == "boot10":
        v = np.array(rec["boot10"])
        v = v[np.isfinite(v)]
        if v.size < 2:
            return float("nan")
        return float(student_t.ppf(0.5 * (1 + level), v.size - 1) * np.sqrt(2) * np.std(v, ddof=1))
    raise ValueError(method)


def bound_interval(rec: dict, method: str, level: float) -> tuple[float, float]:
    import interval

    h = _half(rec, method, level)
    est = rec["estimate"]
    if not np.isfinite(h):
        return float("nan"), float("nan")
    return interval.bound_ends(rec["order"], rec["g_x0"], max(est - h, 0.0), est + h,
                               rec["cap"], rec["grad_norm"])


def coverage(a: dict, b: dict, method: str, level: float):
    """(covered b by a's interval, covered a by b's, relative widths of a, n, n capped)."""
    keys = sorted(set(a) & set(b))
    ab, ba, widths, capped = [], [], [], 0
    for k in keys:
        lo, hi = bound_interval(a[k], method, level)
        lo2, hi2 = bound_interval(b[k], method, level)
        ab.append(bool(lo <= b[k]["bound"] <= hi))
        ba.append(bool(lo2 <= a[k]["bound"] <= hi2))
        widths.append((hi - lo) / a[k]["bound"])
        cap = a[k]["cap"]
        capped += int(cap is not None and a[k]["bound"] == cap and b[k]["bound"] == cap)
    return np.array(ab), np.array(ba), np.array(widths), len(keys), capped


def main(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    pairs = list(zip(seeds[0::2], seeds[1::2]))
    models = args.models.split(",")
    nbs = [int(n) for n in args.nbs.split(",")]
    for seed in seeds:
        for model in models:
            stage1(args, model, seed)
    if args.stage1_only:
        return 0
    t0 = time.time()
    fits = {}
    for seed in seeds:
        for model in models:
            folder = os.path.join(args.dir, f"s{seed}", MODEL_DIRNAME[model])
            if not glob.glob(os.path.join(folder, "*.mat")):
                continue
            for nb in nbs:
                if nb > run_size(args, model, seed)[1]:
                    continue
                fits[(seed, model, nb)] = column_fits(
                    args, folder, nb, os.path.join(args.dir, f"fits_s{seed}_{model}_{nb}.json"))
    methods = ["boot10"]   # interval.SCHEME's default: the parametric bootstrap
    if args.methods:
        methods += ["sub5:0.5", "sub5:0.4", "sub5:0.3", "sub5:0.25"]
    ok = True
    for method in methods:
        print(f"# method {method}, level {args.level:g}")
        print("model    N_b  seeds      n  capped  cover_1in2  cover_2in1  both   "
              "median_rel_width")
        pooled = defaultdict(list)
        for model in models:
            for nb in nbs:
                for s1, s2 in pairs:
                    if (s1, model, nb) not in fits or (s2, model, nb) not in fits:
                        continue
                    ab, ba, w, n, capped = coverage(fits[(s1, model, nb)], fits[(s2, model, nb)],
                                                    method, args.level)
                    both = np.concatenate([ab, ba])
                    pooled["all"].append(both)
                    pooled[f"{s1}/{s2}"].append(both)
                    pooled[model].append(both)
                    pooled[f"N_b {nb}"].append(both)
                    good = 0.85 <= both.mean() <= 0.95
                    if method == methods[0]:
                        ok &= good
                    print(f"{model:<8}{nb:>4}  {s1}/{s2}  {n:>4}  {capped:>5}  "
                          f"{ba.mean():>10.3f}  {ab.mean():>10.3f}  {both.mean():.3f}  "
                          f"{np.nanmedian(w):.3f}{'' if good else '  (outside 0.85-0.95)'}")
        print("pooled: " + ", ".join(f"{k} {np.concatenate(v).mean():.3f} "
                                      f"({np.concatenate(v).size})" for k, v in pooled.items()))
    if args.methods:
        recs = [r for f in fits.values() for r in f.values() if "t_boot10" in r]
        if recs:
            print("# CPU s per column (subset and bootstrap fits): " + ", ".join(
                f"{m} {np.mean([r[m] for r in recs]):.3f}" for m in
                ("t_sub5", "t_boot10")))
    if args.cost:
        cost(args, seeds[0], models)
    print(f"{'PASS' if ok else 'FAIL'} (bench time {time.time() - t0:.0f} s)")
    return 0 if ok else 1


def cost(args, seed: int, models) -> None:
    """Stage 2's wall time with --interval over without: score_folder, same files,
    ``--nthreads`` processes, interleaved rounds, minimum of each kept."""
    import stage2

    times = defaultdict(list)
    for _ in range(3):
        for level in (0.0, args.level):
            for model in models:
                folder = os.path.join(args.dir, f"s{seed}", MODEL_DIRNAME[model])
                t = time.perf_counter()
                stage2.score_folder(folder, stage2.Options(interval=level,
                                                           nthreads=args.nthreads))
                times[(model, level)].append(time.perf_counter() - t)
    for model in models:
        a, b = min(times[(model, 0.0)]), min(times[(model, args.level)])
        print(f"stage-2 time {model}: {a:.2f} s without, {b:.2f} s with the interval: "
              f"ratio {b / a:.2f}")
    a = sum(min(times[(m, 0.0)]) for m in models)
    b = sum(min(times[(m, args.level)]) for m in models)
    print(f"stage-2 time ratio with/without --interval {args.level:g}: {b / a:.2f}")


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
