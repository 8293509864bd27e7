#!/usr/bin/env python3
"""sweep.py against sequential collect_gradients.py processes, and its scheduling overhead.

The 4 digits models (normal, distilled, brelu, 2-layer) x --numimg images x
3 targets, stage 1 only:
  (a) wall time of one collect_gradients.py process per model, one after
      the other (what users' shell loops do), and of one sweep.py with
      --workers local actors; the files of both are compared bit for bit;
  (b) the scheduling overhead per task: the driver's round trip of a task
      minus the time the worker spent in the compiled iterations, as a
      share of the task's time (target: at most 2%).

    python bench/bench_sweep.py [--numimg 8 --workers 2 -N 1024 -i 500 --models_dir DIR]

The models are trained into --models_dir first if they are not there.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

MODELS = ("normal", "distilled", "brelu", "2-layer")
FILES = {"normal": "digits.keras", "distilled": "digits-distilled-100.keras",
         "brelu": "digits_brelu.keras", "2-layer": "digits_2layer.keras"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numimg", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-N", "--Nsamps", type=int, default=1024)
    p.add_argument("-i", "--Niters", type=int, default=500)
    p.add_argument("--models_dir", default="models")
    p.add_argument("--work_dir", default="", help="where results go (default: a temporary folder)")
    p.add_argument("--skip_sequential", action="store_true")
    return p.parse_args(argv)


def _run(cmd) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode != 0:
        sys.exit(f"bench_sweep: {' '.join(cmd[:3])}... failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _train(models_dir: str) -> None:
    missing = [m for m in MODELS if not os.path.exists(os.path.join(models_dir, FILES[m]))]
    if missing:
        print(f"[BENCH] training {','.join(missing)} into {models_dir}", flush=True)
        _run([sys.executable, "train_models.py", "--dataset", "digits", "--models",
              ",".join(missing), "--models_dir", models_dir])


def main(args) -> int:
    import scipy.io

    models_dir = os.path.abspath(args.models_dir)
    _train(models_dir)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-sweep-")
    common = ["-d", "digits", "--models_dir", models_dir, "-n", str(args.numimg), "-N",
              str(args.Nsamps), "-i", str(args.Niters), "-q", "--no_progress"]
    seq_save = os.path.join(work, "sequential")
    t_seq = None
    if not args.skip_sequential:
        t_seq = 0.0
        for m in MODELS:
            t_seq += _run([sys.executable, "collect_gradients.py", "-m", m, "-s", seq_save]
                          + common)
        print(f"[BENCH] sequential collect_gradients.py, {len(MODELS)} processes: "
              f"{t_seq:.1f} s", flush=True)
    sweep_save, out = os.path.join(work, "sweep"), os.path.join(work, "out")
    t_sweep = _run([sys.executable, "sweep.py", "--models", ",".join(MODELS), "--workers",
                    str(args.workers), "-s", sweep_save, "--out", out, "--no_stage2"] + common)
    line = f"[BENCH] sweep.py, {args.workers} local workers: {t_sweep:.1f} s"
    if t_seq:
        line += f" (sequential / sweep = {t_seq / t_sweep:.2f}x)"
    print(line, flush=True)

    prov = json.load(open(os.path.join(out, "provenance.json")))
    tasks = [t for t in prov["tasks"] if t["kind"] == "score"]
    wall = np.array([t["wall_seconds"] for t in tasks])
    compute = np.array([t["compute_seconds"] for t in tasks])
    overhead = wall - compute
    print(f"[BENCH] {len(tasks)} tasks: mean task {wall.mean():.3f} s, mean overhead "
          f"{1e3 * overhead.mean():.2f} ms (median {1e3 * np.median(overhead):.2f} ms), "
          f"overhead share {overhead.sum() / wall.sum():.2%} (target <= 2%)", flush=True)
    setups = [t["worker_seconds"] for t in prov["tasks"] if t["kind"] == "setup"]
    print(f"[BENCH] model loads: {len(setups)}, mean {np.mean(setups):.1f} s; "
          f"files written by the driver: mean {1e3 * np.mean([t['write_seconds'] for t in tasks]):.2f}"
          " ms per task (overlapping the next task)", flush=True)

    if t_seq is not None:
        mine = sorted(glob.glob(os.path.join(sweep_save, "*", "*.mat")))
        same = len(mine) == len(glob.glob(os.path.join(seq_save, "*", "*.mat"))) and all(
            scipy.io.loadmat(f)[k].tobytes() == scipy.io.loadmat(
                f.replace(sweep_save, seq_save))[k].tobytes()
            for f in mine for k in ("G1_max", "G2_max", "Gi_max", "g_x0"))
        print(f"[BENCH] {len(mine)} files, identical to collect_gradients.py's: {same}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
