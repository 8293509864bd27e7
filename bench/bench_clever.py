#!/usr/bin/env python3
"""Benchmark of stage 2: parallel fits against ``--nthreads 1``.

Writes 90 stage-1 files of 500 maxima each (reverse Weibull draws, three
norms per file) in a temporary folder, runs the stage-2 CLI on them with all
cores and with ``--nthreads 1``, and prints the wall times, their ratio
(target: at most 0.6 on 2 cores) and the per-file fit time. The two runs must
print the same lines; the benchmark fails otherwise.

    .venv/bin/python bench/bench_clever.py [--files 90] [--niters 500] [--repeats 1]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import scipy.io
from scipy.stats import weibull_min

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

CLEVER_PY = os.path.join(ROOT, "clever.py")


def write_files(folder: str, n_files: int, niters: int, seed: int = 1215) -> None:
    """n_files order-1 files (30 images x 3 targets for 90) of niters maxima per norm."""
    rng = np.random.default_rng(seed)
    infos = (("least", 3), ("random", 5), ("top2", 8))
    for k in range(n_files):
        img, (info, target) = divmod(k, 3)[0], infos[k % 3]
        data = {}
        for key, loc in (("G1_max", 30.0), ("G2_max", 2.0), ("Gi_max", 0.3)):
            shape = rng.uniform(2.0, 6.0)
            data[key] = loc * rng.uniform(0.8, 1.2) - weibull_min.rvs(
                shape, scale=0.2 * loc, size=niters, random_state=rng)
            data["L" + key[1:]] = np.zeros(niters)
        data.update(g_x0=rng.uniform(0.5, 3.0), pred=rng.normal(size=10), id=img,
                    true_label=0, target_label=target, info=info,
                    args={"sample_norm": "l2", "Nsamps": 1024, "Niters": niters},
                    path=folder, radius=3.0, sample_norm="l2", dim=784)
        name = common.MatName(1024, niters, img, 0, target, info, "relu", 1)
        scipy.io.savemat(os.path.join(folder, name.filename()), data)


def run(folder: str, nthreads: int) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, CLEVER_PY, folder, "--nthreads", str(nthreads)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_clever: clever.py --nthreads {nthreads} failed:\n{proc.stderr}")
    return wall, proc.stdout


def run_inprocess(folder: str, nthreads: int) -> float:
    """score_folder in this process: the fits and the pool, without interpreter start."""
    import clever

    start = time.perf_counter()
    clever.score_folder(folder, clever.Options(nthreads=nthreads))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=90)
    parser.add_argument("--niters", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the two runs this many times; report the best of each")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_clever_") as folder:
        write_files(folder, args.files, args.niters)
        par_times, ser_times, par_in, ser_in = [], [], [], []
        for _ in range(args.repeats):
            wall, par_out = run(folder, cores)
            par_times.append(wall)
            wall, ser_out = run(folder, 1)
            ser_times.append(wall)
            if par_out != ser_out:
                sys.exit("bench_clever: parallel and serial outputs differ")
            par_in.append(run_inprocess(folder, cores))
            ser_in.append(run_inprocess(folder, 1))
    par, ser = min(par_times), min(ser_times)
    fits = 3 * args.files
    print(f"stage 2 on {args.files} files x 3 norms x {args.niters} maxima, {cores} cores "
          f"(wall time of the CLI, process start included)")
    print(f"  --nthreads {cores}: {par:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in par_times)})")
    print(f"  --nthreads 1: {ser:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in ser_times)})")
    print(f"  ratio parallel / serial = {par / ser:.3f}   (target <= 0.6 on 2 cores)")
    print(f"  in-process score_folder (no interpreter start): {min(par_in):.2f} s / "
          f"{min(ser_in):.2f} s = {min(par_in) / min(ser_in):.3f}")
    print(f"  per-file fit time (serial, in-process) = {1000 * min(ser_in) / args.files:.1f} ms "
          f"({1000 * min(ser_in) / fits:.1f} ms per norm, 7 starts each)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  load average at the end: {load:.2f} (other work on the machine disturbs the ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
