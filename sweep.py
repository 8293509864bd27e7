#!/usr/bin/env python3
"""CLEVER over a model zoo on a Ray cluster: stage 1 and stage 2 in one command.

    python sweep.py -d digits --models normal,distilled,brelu,2-layer -n 100 \\
        --targets top2,random,least -N 1024 -i 500 -s lipschitz_mat --out results/sweep

Every flag of ``collect_gradients.py`` (data, images, targets, sampling,
output) is accepted with the same name and meaning; ``--models`` replaces
``--model_name``/``--model_path`` and takes a comma-separated list of zoo
names, model names under ``--models_dir`` and model files (``.keras``,
``.h5``, SavedModel folders, ``.pb``). ``--spec sweep.toml`` lists jobs that
differ in data set, model or flags.

How the work is spread (one core, two drivers: the per-image work is
``stage1.score_image``, the same function ``collect_gradients.py`` runs):

* One Ray actor per worker slot loads and compiles one model, then scores a
  stream of (image, targets) tasks of that model. The driver hands a task to
  an actor when it is free, so a slow image never idles the other actors;
  an actor whose model has no work left is retired and its slot goes to the
  next model.
* Planning (which files are missing) needs the targets, i.e. the logits at
  the clean images. The first actor of a model computes them on the worker
  (the same device and the same batches as ``collect_gradients.py``, so
  target choices and g(x0) are bit-identical); the driver then drops the
  (image, target) pairs whose file exists before any scoring task is
  scheduled. The driver needs no accelerator.
* No shared file system: the driver sends the model file's bytes and the
  images through the object store; workers return the arrays of each
  ``.mat`` file and the DRIVER writes them atomically into
  ``<save>/<dataset>_<model>/`` exactly as ``collect_gradients.py`` does.
* A worker that dies has its task resubmitted to another actor (up to
  ``--max_retries`` times); a file is written once, by the driver, when its
  result arrives. A model that fails to load fails its own job with one line.
  A killed driver leaves only complete files; rerunning resumes.
* Stage 2 runs as one Ray CPU task per file (the fit of ``clever.py``); the
  driver writes ``--out``: summary.csv, summary.md, records.json,
  records.csv and provenance.json. Every record carries its job's label
  (``sweep_jobs.job_labels``); the summary's rows are per job, info and norm,
  aggregated by ``aggregate.py`` as ``clever.py`` does (``sweep_summary.py``,
  docs/sweeps.md).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import common
import settings
from common import ToolError
# The engine, re-exported for scripts and tests that know it under sweep's name.
from sweep_driver import (NAMESPACE, PROG, ROOT, Sweep, SweepOptions, connect,  # noqa: F401
                          default_workers, run)
from sweep_jobs import MODEL_FLAGS, build_jobs  # noqa: F401


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Every other flag is a flag of collect_gradients.py with the same meaning "
               "(-d, -n, -f, --ids, --targets, --target_type, -N, -i, --sample_norm, --radius, "
               "--order, --seed, -s/--save, --overwrite, --models_dir, --data_dir, ...): "
               "see python collect_gradients.py --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--models", default="",
                   help="comma-separated models: zoo names (normal, distilled, brelu, 2-layer, "
                        "ImageNet names), names under --models_dir, or model files")
    g.add_argument("--spec", default="",
                   help="TOML file of jobs: [defaults] and [[job]] tables whose keys are "
                        "collect_gradients.py flags (long names) plus 'models'")
    g.add_argument("--out", default="results/sweep", help="folder of the summaries")
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default="",
                   help="'' starts Ray on this machine; 'auto' or ray://HOST:PORT (or HOST:PORT) "
                        "joins a running cluster")
    g.add_argument("--workers", type=int, default=0,
                   help="model actors at once (0: the cluster's GPUs, else its CPUs / 2)")
    g.add_argument("--gpus_per_worker", type=float, default=None,
                   help="GPUs per actor (default 1 where the cluster has GPUs, else 0; "
                        "fractions share a GPU)")
    g.add_argument("--cpus_per_worker", type=float, default=1.0, help="CPUs reserved per actor")
    g.add_argument("--num_cpus", type=int, default=0,
                   help="CPUs of a local Ray (--address ''; 0: all of this machine's)")
    g.add_argument("--max_retries", type=int, default=3,
                   help="times a task is resubmitted after its worker process died")
    g.add_argument("--ship_code", choices=("auto", "yes", "no"), default="auto",
                   help="upload this folder's code to the workers (auto: when joining a cluster)")
    g.add_argument("--no_stage2", action="store_true", help="stage 1 only")
    g.add_argument("--shape_reg", type=float, default=0.01, help="stage 2: as clever.py")
    g.add_argument("--method", choices=("mle_reg", "mle", "maxsamp"), default="mle_reg",
                   help="stage 2: as clever.py")
    g.add_argument("--interval", type=float, default=0.9, metavar="LEVEL",
                   help="stage 2: as clever.py (each bound's range for another seed, "
                        "docs/intervals.md; 0: none)")
    return p


def parse_args(argv: Sequence[str]) -> SweepOptions:
    """The command line as a :class:`sweep_driver.SweepOptions`; the stage-1 flags (every
    flag sweep.py does not know) are those given, checked once here."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        _sweep_parser().parse_args(["--help"])
    ns, rest = _sweep_parser().parse_known_args(argv)
    for flag in MODEL_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ToolError(f"{flag}: sweep.py takes its models from --models (or --spec)")
    try:
        shared = settings.given_flags(rest)
    except settings.SettingsError as err:
        raise ToolError(f"arguments: {err}") from None
    return SweepOptions.create(stage1=shared, **vars(ns))


def main(options: SweepOptions) -> int:
    common.setup_logging(options.base.verbose)
    return run(options)


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog=PROG))
