#!/usr/bin/env python3
"""Yardstick of --converge: early-stopped CLEVER scores against the full run's noise.

On the digits ``normal`` and ``2-layer`` models, 10 images, targets top2, random
and least, N_s 128, N_b 500, R 5: stage 1 with the full N_b and two seeds, and
the early-stopped run of the first seed; stage 2 (``clever.score_folder``) on
each. Prints, over every (model, image, target, bound norm):

* q90 |early/full - 1|           (early and full of the first seed)
* 1.25 x q90 |full2/full1 - 1|   (the full run's seed-to-seed noise)
* the mean N_b used by the early run (target: at most 170)

(the first three also per model) and ``PASS`` when the first is at most the
second and the mean N_b used at most 170. The rule is ConvergenceRule's
defaults with --tol (--min_iters, --check_every, --stable_checks and
--converge_noise override them). The second seed's run scores the first
seed's targets (``--ids`` with the first run's target classes, ``--targets
user``), so that only sampling differs.

The early run is replayed (``--early replay``, default): batch i of a stage-1 run
depends only on (seed, image, i), so an early-stopped run's maxima are the first
N_used rows of the full run's; the rule (fit_columns + decide, as in
converge.simulate) is applied to the full run's maxima and truncated copies of
its files, with the rule's provenance, are written for stage 2. ``--early run``
runs collect_gradients.py --converge instead (the same files, as a check).

Stage-1 runs are cached under --dir (default /tmp/converge_bench; existing files
are kept), and so are the rule's fits (grid/) and stage 2's results, so reruns are
quick. ``--tune`` also prints a table of candidate rules replayed on those fits;
``--no_run`` uses only the stage-1 files already there (partial runs too).

    .venv/bin/python bench/bench_converge.py [--dir /tmp/converge_bench] [--tol 0.01]
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import scipy.io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import converge  # noqa: E402
from converge import ConvergenceRule  # noqa: E402

PY = sys.executable
KEYS = ("G1_max", "G2_max", "Gi_max")
MODEL_DIRNAME = {"normal": "digits_normal", "2-layer": "digits_2-layer"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/converge_bench", help="cache of models and runs")
    p.add_argument("--models", default="normal,2-layer")
    p.add_argument("--numimg", type=int, default=10)
    p.add_argument("--Nsamps", type=int, default=128)
    p.add_argument("--Niters", type=int, default=500)
    p.add_argument("--radius", type=float, default=5.0)
    p.add_argument("--seeds", default="1215,1216", help="first and second seed")
    defaults = ConvergenceRule(tol=0.01)
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--min_iters", type=int, default=defaults.min_iters)
    p.add_argument("--check_every", type=int, default=defaults.check_every)
    p.add_argument("--stable_checks", type=int, default=defaults.stable_checks)
    p.add_argument("--converge_noise", type=float, default=defaults.noise_factor)
    p.add_argument("--early", choices=("replay", "run"), default="replay")
    p.add_argument("--no_run", action="store_true",
                   help="run no stage 1: use the cached files there are (partial runs too)")
    p.add_argument("--cached_only", action="store_true",
                   help="--tune: fit nothing new (a check not cached ends the image unstopped)")
    p.add_argument("--tune", action="store_true", help="also print candidate rules (grid)")
    p.add_argument("--grid_max", type=int, default=300,
                   help="--tune: no check beyond this many batches (fits are cached)")
    return p.parse_args(argv)


def stage1(args, model: str, seed: int, save: str, extra=()) -> None:
    """One collect_gradients.py run (files already there are kept)."""
    folder = os.path.join(save, MODEL_DIRNAME[model])
    if args.no_run or len(glob.glob(os.path.join(folder, "*.mat"))) >= 3 * args.numimg:
        return
    cmd = [PY, os.path.join(ROOT, "collect_gradients.py"), "-d", "digits", "-m", model,
           "--models_dir", os.path.join(args.dir, "models"), "-N", str(args.Nsamps),
           "-i", str(args.Niters), "--radius", repr(args.radius), "--seed", str(seed),
           "-s", save, "-q", "--no_progress", *extra]
    print("#", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def load_runs(folder: str) -> dict:
    """{(image id, target label): (path, mat dict)} of one model's folder."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.mat"))):
        mat = scipy.io.loadmat(path)
        out[(int(mat["id"].ravel()[0]), int(mat["target_label"].ravel()[0]))] = (path, mat)
    return out


def image_maxima(runs: dict) -> dict:
    """{image id: (target labels, maxima [N_b, T, 3])} from one folder's files."""
    by_img = defaultdict(list)
    for (img, target), (_, mat) in sorted(runs.items()):
        by_img[img].append((target, np.stack([mat[k].ravel().astype(np.float64) for k in KEYS], 1)))
    # Only complete images (a run still writing may have some of an image's files).
    n_t = max((len(rows) for rows in by_img.values()), default=0)
    return {img: ([t for t, _ in rows], np.stack([m for _, m in rows], 1))
            for img, rows in by_img.items() if len(rows) == n_t}


class FitCache:
    """Stage 2's fits of one image's columns at given iterations, cached on disk.

    ``get(it)`` -> (estimates, p-values, exact), each [T, 3], of the first ``it``
    maxima (ConvergenceRule.fit_columns); the rule's fit settings are its defaults.
    """

    def __init__(self, path: str, maxima: np.ndarray, rule: ConvergenceRule):
        self.path, self.maxima, self.rule = path, maxima, rule
        self.fits = {}
        self.halves_path = path.replace(".npz", "_halves.npz")
        self.halves = {}   # it -> (estimates of the even batches, of the odd batches)
        if os.path.exists(self.halves_path):
            z = np.load(self.halves_path)
            for j, it in enumerate(z["its"]):
                self.halves[int(it)] = (z["even"][j], z["odd"][j])
        if os.path.exists(path):
            z = np.load(path)
            its = z["its"] if "its" in z else range(25, 25 * len(z["est"]) + 1, 25)
            for j, it in enumerate(its):
                self.fits[int(it)] = (z["est"][j], z["pval"][j], z["exact"][j])

    def get_halves(self, it: int, cached_only: bool = False):
        """(estimates of the even batches, of the odd batches), each [T, 3], of the
        first ``it`` maxima; None if not cached and ``cached_only``."""
        if it not in self.halves:
            if cached_only:
                return None
            m = self.maxima[:it]
            self.halves[it] = (self.rule.fit_columns(m[0::2])[0], self.rule.fit_columns(m[1::2])[0])
            its = sorted(self.halves)
            np.savez(self.halves_path + ".tmp.npz", its=np.array(its),
                     even=np.stack([self.halves[i][0] for i in its]),
                     odd=np.stack([self.halves[i][1] for i in its]))
            os.replace(self.halves_path + ".tmp.npz", self.halves_path)
        return self.halves[it]

    def get(self, it: int, cached_only: bool = False):
        """Fits at ``it`` batches; None if not cached and ``cached_only``."""
        if it not in self.fits:
            if cached_only:
                return None
            self.fits[it] = self.rule.fit_columns(self.maxima[:it])
            its = sorted(self.fits)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            np.savez(self.path + ".tmp.npz", its=np.array(its),
                     **{name: np.stack([self.fits[i][n] for i in its])
                        for n, name in enumerate(("est", "pval", "exact"))})
            os.replace(self.path + ".tmp.npz", self.path)
        return self.fits[it]


def replay_image(rule: ConvergenceRule, cache: FitCache, n_b: int, limit: int | None = None,
                 cached_only: bool = False):
    """converge.simulate with cached fits: (batches used, checks); checks are only
    fitted up to ``limit`` (None: n_b), beyond which (or, with ``cached_only``, at
    the first check not cached) the image counts as not stopped."""
    history = []
    for it in range(rule.first_check(), n_b + 1, rule.check_every):
        if limit is not None and it > limit:
            break
        fits = cache.get(it, cached_only)
        if fits is None:
            break
        spread = None
        if rule.needs_spread(fits[0], history):
            halves = cache.get_halves(it, cached_only)
            if halves is None:
                break
            spread = converge.half_spread(*halves, fits[0])
        check = rule.decide(it, *fits, history, spread)
        history.append(check)
        if check.stop:
            return it, history
    return n_b, history


def replay(rule: ConvergenceRule, runs: dict, out_folder: str, cache_dir: str) -> dict:
    """Apply ``rule`` to each image of ``runs``; write truncated files; {image: N_used}."""
    os.makedirs(out_folder, exist_ok=True)
    used = {}
    for img, (targets, maxima) in image_maxima(runs).items():
        cache = FitCache(os.path.join(cache_dir, f"{img}.npz"), maxima, rule)
        n, checks = replay_image(rule, cache, maxima.shape[0])
        used[img] = n
        for target in targets:
            path, mat = runs[(img, target)]
            out = os.path.join(out_folder, os.path.basename(path))
            if os.path.exists(out) and int(scipy.io.loadmat(out, variable_names=["Niters_used"])
                                           ["Niters_used"].ravel()[0]) == n:
                continue  # written by an earlier run of the bench (same rule, same data)
            rec = {k: v for k, v in mat.items() if not k.startswith("__")}
            for key in KEYS + ("L1_max", "L2_max", "Li_max"):
                if key in rec:
                    rec[key] = rec[key].ravel()[:n]
            rec.update(converge.provenance(rule, n, maxima.shape[0],
                                           [c.to_record() for c in checks]))
            common.atomic_savemat(out, rec)
    return used


def stage2(folder: str, cache_path: str | None = None) -> dict:
    """{(image, target, norm label): (reported CLEVER bound, g_x0, cap)} by stage 2
    (clever.score_folder, default options) on ``folder``; with ``cache_path``, files
    already scored (same path, size and mtime) are not fitted again."""
    import tempfile

    import clever

    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as fh:
            cache = json.load(fh)
    paths = sorted(glob.glob(os.path.join(folder, "*.mat")))
    stamp = {p: f"{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in paths}
    todo = [p for p in paths if cache.get(p, {}).get("stamp") != stamp[p]]
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            for p in todo:
                os.symlink(p, os.path.join(tmp, os.path.basename(p)))
            result = clever.score_folder(tmp, clever.Options())
        for f in result.files:
            src = os.path.join(folder, os.path.basename(f.file.path))
            cache[src] = {"stamp": stamp[src], "id": f.file.img_id, "target": f.file.target_label,
                          "g_x0": f.file.g_x0,
                          "norms": {n.label: [result.reported(sc), sc.cap]
                                    for n, sc in f.scores.items()}}
        if cache_path:
            common.atomic_write_text(cache_path, json.dumps(cache))
    out = {}
    for p in paths:
        rec = cache.get(p)
        if rec is None:
            continue
        for label, (bound, cap) in rec["norms"].items():
            out[(rec["id"], rec["target"], label)] = (bound, rec["g_x0"], cap)
    return out


def q90_rel(a: dict, b: dict) -> tuple[float, int]:
    """90th percentile of |a/b - 1| over the keys both have, and their number."""
    keys = sorted(set(a) & set(b))
    r = np.array([abs(a[k] / b[k] - 1.0) for k in keys])
    return float(np.percentile(r, 90)), len(keys)


# --------------------------------------------------------------------------
# --tune: candidate rules from fits cached on a grid of iterations
# --------------------------------------------------------------------------
def tune(args, caches: dict, full1: dict, full2: dict, mats: dict) -> None:
    import clever

    noise, _ = q90_rel(full2, full1)
    per_model = {m: q90_rel({k: v for k, v in full2.items() if k[0] == m}, full1)[0]
                 for m in caches}
    print(f"# tune: 1.25 x q90 seed noise = {1.25 * noise:.4f} ("
          + ", ".join(f"{m} {1.25 * q:.4f}" for m, q in per_model.items())
          + f"); rules replayed with checks up to {args.grid_max} batches"
          f"{' (cached fits only)' if args.cached_only else ''}; an image not stopped there "
          "counts with the full N_b and estimate")
    print("# ok: both targets over all models; '+': the error target also holds per model")
    print("tol  noise min_iters check_every stable  q90_early  mean_N_b  ok   "
          + "  ".join(f"{m}:q90/N_b" for m in caches))
    for tol, nf, mi, ce, sc in itertools.product((0.01, 0.02, 0.05), (0.0, 0.5, 1.0, 2.0),
                                                 (50, 100), (25, 50), (1, 2)):
        rule = ConvergenceRule(tol=tol, min_iters=mi, check_every=ce, stable_checks=sc,
                               noise_factor=nf)
        early, used = {}, defaultdict(list)
        for model, per_image in caches.items():
            for img, (targets, cache) in per_image.items():
                n_used, history = replay_image(rule, cache, args.Niters, args.grid_max,
                                               cached_only=args.cached_only)
                last = history[-1] if history and history[-1].stop else None
                used[model].append(n_used)
                for t, target in enumerate(targets):
                    for k, key in enumerate(KEYS):
                        label = {"G1_max": "Li", "G2_max": "L2", "Gi_max": "L1"}[key]
                        kk = (model, img, target, label)
                        if kk not in full1:
                            continue
                        if last is None:
                            early[kk] = full1[kk]
                            continue
                        g, cap = mats[(model, img, target)]
                        b = clever.clever_bound(g, float(last.estimates[t, k]))
                        early[kk] = min(b, cap[label]) if cap[label] is not None else b
        q, _ = q90_rel(early, full1)
        mean_used = float(np.mean([n for v in used.values() for n in v]))
        ok = q <= 1.25 * noise and mean_used <= 170
        q_model = {m: q90_rel({k: v for k, v in early.items() if k[0] == m}, full1)[0]
                   for m in caches}
        models_ok = all(q_model[m] <= 1.25 * per_model[m] for m in caches)
        cols = "  ".join(f"{q_model[m]:.4f}/{np.mean(used[m]):.1f}" for m in caches)
        print(f"{tol:<5g}{nf:<6g}{mi:>9}{ce:>12}{sc:>7}{q:>11.4f}{mean_used:>10.1f}  "
              f"{'yes' if ok else 'no':<3}{'+' if ok and models_ok else ' '} {cols}")


def main(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",")
    if not all(os.path.exists(os.path.join(args.dir, "models", n))
               for n in ("digits.keras", "digits_2layer.keras")):
        subprocess.run([PY, os.path.join(ROOT, "train_models.py"), "--dataset", "digits",
                        "--models", "normal,2-layer", "--models_dir",
                        os.path.join(args.dir, "models")], check=True)
    rule = ConvergenceRule(tol=args.tol, min_iters=args.min_iters, check_every=args.check_every,
                           stable_checks=args.stable_checks, noise_factor=args.converge_noise)
    tag = (f"tol{args.tol:g}_m{args.min_iters}_c{args.check_every}_s{args.stable_checks}"
           f"_n{args.converge_noise:g}")
    full1, full2, early, used, mats, caches = {}, {}, {}, [], {}, {}
    used_by_model = {}
    t0 = time.time()
    for model in models:
        sub = MODEL_DIRNAME[model]
        s1 = os.path.join(args.dir, f"full_s{seeds[0]}")
        stage1(args, model, seeds[0], s1, ["-n", str(args.numimg),
                                           "--targets", "top2,random,least"])
        runs = load_runs(os.path.join(s1, sub))
        ids = os.path.join(args.dir, f"ids_{model}.csv")
        rows = defaultdict(list)
        for img, target in sorted(runs):
            rows[img].append(str(target))
        if not args.no_run:
            common.atomic_write_text(ids, "".join(f"{i},{','.join(t)}\n" for i, t in rows.items()))
        s2 = os.path.join(args.dir, f"full_s{seeds[1]}")
        stage1(args, model, seeds[1], s2, ["--ids", ids, "-n", str(args.numimg),
                                           "--targets", "user"])
        if args.early == "replay":
            folder = os.path.join(args.dir, f"replay_{tag}", sub)
            n_used = replay(rule, runs, folder, os.path.join(args.dir, "grid", sub))
        else:
            save = os.path.join(args.dir, f"run_{tag}")
            stage1(args, model, seeds[0], save,
                   ["-n", str(args.numimg), "--targets", "top2,random,least",
                    "--converge", repr(args.tol), "--min_iters", str(args.min_iters),
                    "--check_every", str(args.check_every),
                    "--converge_noise", repr(args.converge_noise)])
            folder = os.path.join(save, sub)
            n_used = {int(m["id"].ravel()[0]): int(m["Niters_used"].ravel()[0])
                      for _, m in load_runs(folder).values()}
        used += list(n_used.values())
        used_by_model[model] = list(n_used.values())
        for store, src, cached in ((full1, os.path.join(s1, sub), True),
                                   (full2, os.path.join(s2, sub), True),
                                   (early, folder, True)):
            scored = stage2(src, os.path.join(args.dir, "stage2_cache.json") if cached else None)
            for (img, target, label), (bound, g_x0, cap) in scored.items():
                store[(model, img, target, label)] = bound
                if store is full1:
                    mats.setdefault((model, img, target), (g_x0, {}))[1][label] = cap
        if args.tune:
            caches[model] = {
                img: (targets, FitCache(os.path.join(args.dir, "grid", sub, f"{img}.npz"),
                                        maxima, rule))
                for img, (targets, maxima) in image_maxima(runs).items()}
    q_early, n = q90_rel(early, full1)
    q_noise, n2 = q90_rel(full2, full1)
    mean_used = float(np.mean(used))
    ok = q_early <= 1.25 * q_noise and mean_used <= 170
    print(f"rule = {json.dumps(rule.to_dict())}, early = {args.early}")
    for model in models:
        qe, _ = q90_rel({k: v for k, v in early.items() if k[0] == model}, full1)
        qn, _ = q90_rel({k: v for k, v in full2.items() if k[0] == model}, full1)
        print(f"model = {model}, q90_early_vs_full = {qe:.4f}, 1.25_x_q90_seed2_vs_seed1 = "
              f"{1.25 * qn:.4f}, mean_N_b_used = {np.mean(used_by_model[model]):.1f}")
    print(f"q90 |early/full - 1| = {q_early:.4f} over {n} (image, target, norm) bounds")
    print(f"1.25 x q90 |full_seed2/full_seed1 - 1| = {1.25 * q_noise:.4f} over {n2}")
    print(f"mean N_b used = {mean_used:.1f} of {args.Niters} ({len(used)} images; "
          f"{args.Niters / mean_used:.2f}x fewer gradients)")
    print(f"{'PASS' if ok else 'FAIL'} (bench time {time.time() - t0:.0f} s)")
    if args.tune:
        tune(args, caches, full1, full2, mats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
