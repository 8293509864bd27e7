#!/usr/bin/env python3
"""Reproduce the CLEVER paper's Tables 2 to 5 and Figure 6 on one data set.

For each model: stage 1 (``stage1_run``, as ``collect_gradients.py``) for the least-likely,
random and top-2 targets and, into a separate folder, for every class
(untargeted); stage 2 (``clever.py --summary``) on both; then Carlini-Wagner
L2 and I-FGSM (L-infinity and L2) on the same images and the same target
classes the stage-1 files record. Writes to ``--out``:

* ``tables.md``: settings, versions, Tables 2 to 5 (with the paper's numbers
  for the matching MNIST or CIFAR rows), attack success and the issue's
  acceptance checks; the same Markdown goes to stdout;
* ``table2_untargeted.csv``, ``table3_targeted_l2.csv``,
  ``table4_clever_exceeds.csv``, ``table5_ks.csv``, ``attack_success.csv``,
  ``records.csv`` (one row per image and target: CLEVER bounds and attack
  distortions), ``fits.csv`` (one row per Weibull fit), ``acceptance.csv``;
* ``figure6.png``: CLEVER L2 beside the CW L2 distortion per image;
* ``run.json``: what produced all of it (and where the stage-2 summaries and
  attack caches the tables come from are);
* ``logs/``: the printed lines of both stages (the format users parse);
* ``cache/``: attack results, one file per model and attack, named by a hash
  of the model's weights and that attack's settings.

Everything is reused when run again: stage 1 skips existing files (in a
folder per model weights, N_s, N_b, R and seed under ``--save``), stage 2 is
rerun only when its folder changed, attacks run only on (image, target)
pairs their cache lacks. The default settings (10 images, N_s = 128,
N_b = 50, the paper's R = 5 and its CW and I-FGSM settings) make the
documented digits run take about 20 minutes on 2 CPU cores:

    python train_models.py --dataset digits
    python reproduce_tables.py --dataset digits
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

import common
from common import Norm, ToolError, check_positive
from settings import Stage1Settings
from paper_attacks import (AttackSettings, read_attack_cache, run_attacks,  # noqa: F401
                           write_attack_cache)
from paper_tables import (NUM_CLASSES, PAPER_DATASET, PAPER_TABLE2, PAPER_TABLE3, Attack, Kind,
                          acceptance, attack_key, clever_rows, fit_rows, merge_attacks,
                          plot_figure6, render_markdown, success_table, table2, table3, table4,
                          table5)

log = logging.getLogger("clever.tables")

PROG = "reproduce_tables.py"
HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ("digits", "mnist", "cifar")
DEFAULT_MODELS = "normal,distilled,brelu,2-layer"

# Defaults sized for the README run (4 digits models, 2 CPU cores, < 30 min):
# stage 1 costs about (1 + 2 x 12 targets) CNN passes per sample and image,
# so N_s x N_b and the number of images are what the budget buys.
DEFAULT_NUMIMG = 10
DEFAULT_NSAMPS = 128
DEFAULT_NITERS = 50
DEFAULT_CW_BINARY_STEPS = 9
# The paper's radius for its tables (docs/paper_tables.md), not stage 1's R = 3: the
# bound is the margin over the largest gradient norm in the ball, and a radius
# below the CW distortion of the far targets cannot see the steep region near
# the decision boundary (digits BReLU: CLEVER below CW for 30% of pairs at
# R = 3, 87% at R = 5).
DEFAULT_RADIUS = 5.0

#: Targets of the targeted stage-1 run, and the untargeted one (every class).
TARGETED_FLAG = "top2,random,least"
UNTARGETED_FLAG = "all"

#: --ifgsm_loss choices -> the attacks.IFGSMLoss values tried in turn.
IFGSM_LOSSES: dict[str, tuple[str, ...]] = {
    "xent": ("xent",), "margin": ("margin",), "xent_then_margin": ("xent", "margin")}
# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (via ToolError), not usage plus message."""

    def error(self, message):
        raise ToolError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and models")
    g.add_argument("-d", "--dataset", choices=DATASETS, default="digits", help="data set")
    g.add_argument("-m", "--models", default=DEFAULT_MODELS,
                   help="comma list of models: normal, distilled, brelu, 2-layer, or file "
                        "stems under --models_dir")
    g.add_argument("--data_dir", default="data", help="folder of the data set files")
    g.add_argument("--models_dir", default="models", help="folder of the trained models")
    g = p.add_argument_group("images and CLEVER sampling")
    g.add_argument("-n", "--numimg", type=int, default=DEFAULT_NUMIMG,
                   help="test images examined (misclassified ones are skipped per model)")
    g.add_argument("-f", "--firstimg", type=int, default=0, help="index of the first image")
    g.add_argument("-N", "--Nsamps", type=int, default=DEFAULT_NSAMPS,
                   help="samples per batch N_s (paper: 1024)")
    g.add_argument("-i", "--Niters", type=int, default=DEFAULT_NITERS,
                   help="batches N_b (paper: 500)")
    g.add_argument("-R", "--radius", type=float, default=DEFAULT_RADIUS,
                   help="L2 sampling radius R (paper: 5; stage 1 alone defaults to the "
                        "original tool's 3)")
    g.add_argument("--seed", type=int, default=1215, help="random seed of stage 1")
    g = p.add_argument_group("attacks")
    g.add_argument("--cw_iterations", type=int, default=None,
                   help="CW Adam steps per binary-search step (default: the paper's, 2000 "
                        "on MNIST-like data, 1000 on CIFAR)")
    g.add_argument("--cw_binary_steps", type=int, default=DEFAULT_CW_BINARY_STEPS,
                   help="CW binary-search steps over the constant c")
    g.add_argument("--ifgsm_iterations", type=int, default=50,
                   help="I-FGSM steps per eps of the grid (paper: 50)")
    g.add_argument("--ifgsm_loss", choices=tuple(IFGSM_LOSSES), default="xent_then_margin",
                   help="loss I-FGSM ascends: cross-entropy, the logit margin, or "
                        "cross-entropy and then the margin on the images it failed")
    g = p.add_argument_group("cluster (the engine of sweep.py)")
    g.add_argument("--address", default=None,
                   help="run stage 1 (as sweep.py) and the attacks as Ray jobs: 'local' starts "
                        "Ray on this machine, 'auto' or ray://HOST:PORT joins a cluster "
                        "(unset: everything in this process)")
    g.add_argument("--workers", type=int, default=0,
                   help="--address: stage-1 model actors (0: as sweep.py)")
    g.add_argument("--num_cpus", type=int, default=0,
                   help="--address local: CPUs of the local Ray (0: all of this machine's)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--out", default=None, help="tables folder (default results/<dataset>)")
    g.add_argument("-s", "--save", default=os.path.join("lipschitz_mat", "tables"),
                   help="stage-1 folder (a sub-folder per model and settings)")
    g.add_argument("--nthreads", type=int, default=0,
                   help="worker processes of the stage-2 fits (0: all cores)")
    g.add_argument("--overwrite", action="store_true",
                   help="recompute stage 1, stage 2 and the attacks instead of reusing them")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more diagnostics on stderr (-vv for debug)")
    args = p.parse_args(list(argv))
    _validate(args)
    return args


def _validate(args: argparse.Namespace) -> None:
    """Checks that need neither TensorFlow nor data, so a bad flag fails at once."""
    check_positive("--numimg", args.numimg)
    check_positive("--firstimg", args.firstimg, allow_zero=True)
    check_positive("--Nsamps", args.Nsamps)
    check_positive("--Niters", args.Niters)
    check_positive("--radius", args.radius)
    check_positive("--ifgsm_iterations", args.ifgsm_iterations)
    check_positive("--cw_binary_steps", args.cw_binary_steps)
    check_positive("--nthreads", args.nthreads, allow_zero=True)
    check_positive("--workers", args.workers, allow_zero=True)
    check_positive("--num_cpus", args.num_cpus, allow_zero=True)
    if args.address is not None and not (
            args.address in ("local", "auto") or args.address.startswith("ray://")
            or ":" in args.address):
        raise ToolError(f"--address: {args.address!r} is not local, auto, ray://HOST:PORT "
                        "or HOST:PORT")
    if args.cw_iterations is not None:
        check_positive("--cw_iterations", args.cw_iterations)
    if args.Niters < 3:
        raise ToolError(f"--Niters {args.Niters}: a reverse Weibull fit needs at least 3 batch "
                        "maxima")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names:
        raise ToolError("--models is empty")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise ToolError(f"--models lists {dup[0]!r} twice")
    bad = [m for m in names if os.sep in m or m.startswith(".")]
    if bad:
        raise ToolError(f"--models: {bad[0]!r} is not a model name (give a file stem under "
                        "--models_dir)")
    args.model_list = names
    if args.out is None:
        args.out = os.path.join("results", args.dataset)
    if args.nthreads == 0:
        args.nthreads = os.cpu_count() or 1


# --------------------------------------------------------------------------
# Stage 1 and stage 2 (reused when present)
# --------------------------------------------------------------------------
def weights_digest(model) -> str:
    """sha256 of a Keras model's weights: stage-1 folders and caches follow the model."""
    h = hashlib.sha256()
    for w in model.get_weights():
        arr = np.ascontiguousarray(w)
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def stage1_root(save: str, dataset: str, model: str, digest: str, args) -> str:
    """``<save>/<dataset>_<model>_w<digest>_N<Ns>_i<Nb>_R<R>_seed<seed>``: one folder per setting.

    Stage 1 resumes by file name only, which does not encode the seed or the
    model's weights; a folder per (weights, N_s, N_b, R, seed) keeps stale files
    out of a rerun with other settings or a retrained model.
    """
    return os.path.join(save, f"{dataset}_{model}_w{digest[:10]}_N{args.Nsamps}_i{args.Niters}"
                              f"_R{args.radius:.12g}_seed{args.seed}")


def _mat_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".mat") and not f.startswith("."))


def stage1_keywords(args, save: str, targets: str) -> dict:
    """The stage-1 settings of the tables' runs (``settings.Stage1Settings`` keywords),
    the model aside."""
    return dict(dataset=args.dataset, models_dir=args.models_dir, data_dir=args.data_dir,
                numimg=args.numimg, firstimg=args.firstimg, Nsamps=args.Nsamps,
                Niters=args.Niters, radius=args.radius, seed=args.seed, targets=targets,
                save=save, overwrite=args.overwrite, no_progress=args.no_progress)


def run_stage1(args, model: str, save: str, targets: str, log_path: str) -> int:
    """Stage 1 of ``model``, its printed lines into ``log_path``; returns new files.

    In this process (``stage1_run.run_lines``, collect_gradients.py's lines) or,
    with ``--address``, as a sweep job on Ray (``sweep_driver.run``): the same
    settings, the same files (bit for bit) in the same folder."""
    folder = common.output_dir(save, args.dataset, model)
    before = len(_mat_files(folder))
    shared = stage1_keywords(args, save, targets)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as fh:
        if args.address is None:
            import stage1_run

            settings = Stage1Settings.from_kwargs(model_name=model, **shared)
            stage1_run.run_lines(settings, fh, out_dir=settings.out_dir(),
                                 progress=not settings.no_progress)
        else:
            import sweep_driver

            out = os.path.join(os.path.dirname(log_path),
                               os.path.splitext(os.path.basename(log_path))[0] + "_sweep")
            options = sweep_driver.SweepOptions.create(
                models=model, address=_ray_address(args.address), workers=args.workers,
                no_stage2=True, out=out, stage1=shared)
            print(f"# sweep of {model}: {json.dumps(options.record(), sort_keys=True)}", file=fh,
                  flush=True)
            if sweep_driver.run(options, stream=fh) != 0:
                raise ToolError(f"stage 1 of {model} on Ray failed; see {log_path}")
    return len(_mat_files(folder)) - before


def _ray_address(address: str) -> str:
    """sweep.py's --address for ours ('local' is sweep's '')."""
    return "" if address == "local" else address


def _summary_is_current(summary: str, folder: str) -> bool:
    """A summary is reusable when it covers exactly the folder's files and is newer."""
    if not os.path.isfile(summary):
        return False
    files = _mat_files(folder)
    try:
        with open(summary) as fh:
            recorded = {os.path.basename(r["path"]) for r in json.load(fh)["records"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    newest = max((os.path.getmtime(os.path.join(folder, f)) for f in files), default=0.0)
    return recorded == set(files) and os.path.getmtime(summary) >= newest


def run_stage2(folder: str, summary: str, untargeted: bool, nthreads: int, log_path: str,
               force: bool) -> bool:
    """clever.py --summary on ``folder`` in a subprocess (no TensorFlow in its fit workers).

    Returns True when it ran, False when the summary was current and reused.
    """
    if not force and _summary_is_current(summary, folder):
        return False
    if not _mat_files(folder):
        raise ToolError(f"{folder}: stage 1 wrote no files (are all images misclassified?)")
    cmd = [sys.executable, os.path.join(HERE, "clever.py"), folder, "--summary", summary,
           "--nthreads", str(nthreads)] + (["--untargeted"] if untargeted else [])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as fh:
        fh.write("# " + " ".join(cmd[1:]) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    for line in errors:
        log.debug("clever.py: %s", line)
    if proc.returncode == 1 and os.path.isfile(summary):
        # Some files failed; clever.py scored the rest and names the failures.
        for line in errors:
            if "error:" in line:
                log.warning("clever.py: %s", line)
    elif proc.returncode != 0:
        last = errors[-1] if errors else f"exit status {proc.returncode}"
        raise ToolError(f"stage 2 on {folder} failed: {last}")
    return True


def load_summary(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise ToolError(f"{path}: cannot read the stage-2 summary ({err})") from None


# --------------------------------------------------------------------------
# Attacks (paper_attacks.py); on Ray one task per attack
# --------------------------------------------------------------------------
def run_attacks_ray(dataset: str, model_path: str, model, images: Mapping[int, np.ndarray],
                    pairs: Sequence[tuple[int, int]], untargeted_ids: Sequence[int],
                    settings: AttackSettings, cached: dict[str, dict],
                    save) -> tuple[dict[str, dict], int]:
    """:func:`run_attacks` with one Ray task per attack (``sweep_worker.attack_task``).

    The workers load the ``dataset`` model from ``model_path``'s bytes (no shared file
    system) and return their records; ``save`` runs here as each attack ends.
    ``model`` (loaded here) is not used: the signature is run_attacks'.
    """
    import ray

    import sweep_worker

    del model
    blob = ray.put(sweep_worker.pack(model_path))
    task = ray.remote(num_cpus=1, max_retries=3)(sweep_worker.attack_task)
    refs = {task.remote(blob, dataset, dict(images), list(pairs), list(untargeted_ids), settings,
                        {k: v for k, v in cached.items() if v["attack"] == a.value}, a.value): a
            for a in Attack}
    records, computed, pending = dict(cached), 0, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        if "error" in result:
            raise ToolError(f"{refs[done[0]].value} on Ray: {result['error']}")
        records.update(result["records"])
        computed += result["computed"]
        save(refs[done[0]], records)
    return records, computed


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def _model_exists(name: str, models_dir: str) -> bool:
    import models

    if name in models.MODEL_NAMES:
        return True
    return any(os.path.exists(os.path.join(models_dir, name + ext))
               for ext in (models.MODEL_EXT, ".h5", ""))


def _write_csv(df, path: str) -> None:
    common.atomic_write_text(path, df.to_csv(index=False))


def _settings_table(args, summaries: Sequence[Mapping], settings: AttackSettings,
                    ids: Sequence[int]) -> dict[str, object]:
    """What the numbers depend on, read back from the files where they record it."""
    first = next((r for s in summaries for r in s["records"]), {})
    radius, norm, dim = first.get("radius"), first.get("sample_norm", "l2"), first.get("dim")
    fp = first.get("file_provenance", {})
    scheme = "uniform in the ball" if fp.get("uniform_ball") else \
        "direction uniform on the sphere times a radius uniform in [0, R] (original tool)"
    options = summaries[0].get("options", {}) if summaries else {}
    cap_li = common.radius_cap(radius, common.Norm.parse(norm), Norm.LINF, dim) \
        if radius and dim else math.nan
    return {
        "dataset": args.dataset,
        "models": ", ".join(args.model_list),
        "images": f"{len(ids)} test images, ids {ids[0]}..{ids[-1]} (misclassified ones "
                  "skipped per model)",
        "N_s (samples per batch)": args.Nsamps,
        "N_b (batches)": args.Niters,
        "sample norm": norm,
        "radius R": radius,
        "sampling scheme": scheme,
        "bound caps": f"L2: {radius:g}, Linf: {cap_li:.4g} (R / sqrt(d), d = {dim})"
        if radius and dim else "",
        "Weibull fit": f"{options.get('method', 'mle_reg')}, shape_reg "
                       f"{options.get('shape_reg', 0.01)}",
        "seed": args.seed,
        "CW L2": f"{settings.cw_iterations} iterations, {settings.cw_binary_steps} binary "
                 f"search steps, lr {settings.cw_learning_rate:g}, c0 "
                 f"{settings.cw_initial_const:g}, kappa {settings.cw_confidence:g}, early abort",
        "I-FGSM": f"{settings.ifgsm_iterations} iterations per eps, loss "
                  f"{' then '.join(settings.ifgsm_losses)} (each on the previous one's "
                  "failures), stop at first success",
        "I-FGSM Linf eps grid": ", ".join(f"{e:g}" for e in settings.linf_eps),
        "I-FGSM L2 eps grid": ", ".join(f"{e:g}" for e in settings.l2_eps),
    }


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, every setting spelled out."""
    return (f"python {PROG} --dataset {args.dataset} --models {','.join(args.model_list)} "
            f"--numimg {args.numimg} --firstimg {args.firstimg} -N {args.Nsamps} "
            f"-i {args.Niters} --radius {args.radius!r} --seed {args.seed} "
            + (f"--cw_iterations {args.cw_iterations} " if args.cw_iterations else "")
            + f"--cw_binary_steps {args.cw_binary_steps} "
            f"--ifgsm_iterations {args.ifgsm_iterations} --ifgsm_loss {args.ifgsm_loss} --out {args.out} --save {args.save} "
            f"--data_dir {args.data_dir} --models_dir {args.models_dir}")


def timing_note(name: str, info: Mapping) -> str:
    """One line of where a model's time went in this run (cached work takes about 0 s)."""
    sec = info["seconds"]
    return (f"{name}: stage 1 {sec['stage1_targeted_s'] + sec['stage1_untargeted_s']:.0f} s, "
            f"stage 2 {sec['stage2_targeted_s'] + sec['stage2_untargeted_s']:.0f} s, attacks "
            f"{sec['attacks_s']:.0f} s ({info['attacks_computed']} attack results computed, "
            f"{info['attacks_reused']} cached; {info['targeted']['new_stage1_files']} + "
            f"{info['untargeted']['new_stage1_files']} new stage-1 files; I-FGSM needed its "
            f"fallback loss for {info['ifgsm_later_loss']} of {info['ifgsm_results']} results)")


@dataclass
class ModelRun:
    """What one model contributes: table rows, fit rows, its stage-2 summaries, bookkeeping."""

    rows: list[dict]
    fits: list[dict]
    summaries: list[dict]
    info: dict


def process_model(args, name: str, model, ids: Sequence[int], test_data: np.ndarray,
                  settings: AttackSettings, steps) -> ModelRun:
    """Stage 1, stage 2 and the attacks for one model, each reused where already done."""
    import models

    seconds: dict[str, float] = {}
    digest = weights_digest(model)
    root = stage1_root(args.save, args.dataset, name, digest, args)
    logs_dir = os.path.join(args.out, "logs")
    info: dict = {"weights_sha256": digest, "stage1_root": root}
    summaries: dict[str, dict] = {}
    for mode, flag in (("targeted", TARGETED_FLAG), ("untargeted", UNTARGETED_FLAG)):
        steps.set_postfix_str(f"{name}: stage 1 {mode}")
        t0 = time.time()
        save = os.path.join(root, mode)
        new = run_stage1(args, name, save, flag,
                         os.path.join(logs_dir, f"stage1_{name}_{mode}.log"))
        seconds[f"stage1_{mode}_s"] = time.time() - t0
        steps.update(1)
        steps.set_postfix_str(f"{name}: stage 2 {mode}")
        t0 = time.time()
        folder = common.output_dir(save, args.dataset, name)
        summary_path = os.path.join(root, f"summary_{mode}.json")
        ran = run_stage2(folder, summary_path, mode == "untargeted", args.nthreads,
                         os.path.join(logs_dir, f"stage2_{name}_{mode}.log"),
                         force=args.overwrite or new > 0)
        seconds[f"stage2_{mode}_s"] = time.time() - t0
        steps.update(1)
        summaries[mode] = load_summary(summary_path)
        info[mode] = {"stage1_folder": folder, "new_stage1_files": new,
                      "summary": summary_path, "stage2_ran": ran}
    rows = (clever_rows(summaries["targeted"]["records"], name, ids)
            + clever_rows(summaries["untargeted"]["records"], name, ids, untargeted=True))
    fits = (fit_rows(summaries["targeted"]["records"], name, ids)
            + fit_rows(summaries["untargeted"]["records"], name, ids))
    incomplete = [r["id"] for r in rows if r["kind"] == Kind.UNTARGETED.value
                  and r["n_classes"] != NUM_CLASSES]
    if incomplete:
        log.warning("%s: images %s lack some class files; their CLEVER-u is a minimum over "
                    "fewer classes", name, incomplete)

    steps.set_postfix_str(f"{name}: attacks")
    t0 = time.time()
    cache_paths = {a: os.path.join(args.out, "cache", f"attacks_{args.dataset}_{name}_{a.value}_"
                                   f"{settings.key(a, args.dataset, name, digest)}.json")
                   for a in Attack}
    cached = {} if args.overwrite else {
        k: v for a in Attack for k, v in read_attack_cache(cache_paths[a]).items()}
    pairs = [(r["id"], r["target"]) for r in rows if r["kind"] != Kind.UNTARGETED.value]
    untargeted_ids = [r["id"] for r in rows if r["kind"] == Kind.UNTARGETED.value]
    images = {i: test_data[i] for i in set(untargeted_ids) | {i for i, _ in pairs}}
    runner = run_attacks if args.address is None else functools.partial(
        run_attacks_ray, args.dataset,
        models.model_file(args.dataset, name, models_dir=args.models_dir))
    results, computed = runner(
        model, images, pairs, untargeted_ids, settings, cached,
        lambda attack, recs: write_attack_cache(cache_paths[attack], attack, recs, settings,
                                                args.dataset, name, digest))
    reused = len(Attack) * (len(pairs) + len(untargeted_ids)) - computed
    log.info("%s: %d attack results computed, %d reused from %s", name, computed, reused,
             os.path.dirname(cache_paths[Attack.CW_L2]))
    seconds["attacks_s"] = time.time() - t0
    steps.update(1)
    rows = merge_attacks(rows, results)
    # Stage 1 skipped misclassified images, so every attacked image should be
    # predicted as its true label; a mismatch means another model made the files.
    relabeled = [(r["id"], results[attack_key(a, r["id"], r["target"])]["label"])
                 for r in rows for a in Attack
                 if results[attack_key(a, r["id"], r["target"])]["label"] != r["true_label"]]
    if relabeled:
        log.warning("%s: the attacks saw other predicted classes than stage 1 for %d "
                    "results (e.g. image %d as %d)", name, len(relabeled), *relabeled[0])
    # Which I-FGSM results needed a later loss of --ifgsm_loss (softmax saturation).
    later = [r for r in rows for a in (Attack.IFGSM_LINF, Attack.IFGSM_L2)
             if results[attack_key(a, r["id"], r["target"])].get("loss", settings.ifgsm_losses[0])
             != settings.ifgsm_losses[0]]
    info.update(attack_caches={a.value: p for a, p in cache_paths.items()}, attacks_computed=computed, attacks_reused=reused,
                ifgsm_later_loss=len(later), ifgsm_results=2 * len(rows), seconds=seconds)
    return ModelRun(rows, fits, [summaries["targeted"], summaries["untargeted"]], info)


#: Output files of the tables (key of :func:`build_tables`'s dict -> CSV name).
TABLE_FILES = {"table2": "table2_untargeted.csv", "table3": "table3_targeted_l2.csv",
               "table4": "table4_clever_exceeds.csv", "table5": "table5_ks.csv",
               "success": "attack_success.csv"}


def build_tables(dataset: str, rows: Sequence[Mapping], fits: Sequence[Mapping]) -> dict:
    """All tables as DataFrames, with the paper's rows for the matching data set."""
    paper = PAPER_DATASET[dataset]
    return {"table2": table2(rows, PAPER_TABLE2.get(paper)),
            "table3": table3(rows, PAPER_TABLE3.get(paper)),
            "table4": table4(rows), "table5": table5(fits), "success": success_table(rows)}


def write_outputs(args, ids: Sequence[int], runs: Mapping[str, ModelRun],
                  settings: AttackSettings, start: float) -> str:
    """Write CSVs, the figure, tables.md and run.json into ``args.out``; return the Markdown."""
    import matplotlib
    import pandas as pd

    rows = [r for run in runs.values() for r in run.rows]
    fits = [f for run in runs.values() for f in run.fits]
    tables = build_tables(args.dataset, rows, fits)
    accept = acceptance(rows, fits)
    versions = dict(common.versions(with_tf=True))
    versions.update(pandas=pd.__version__, matplotlib=matplotlib.__version__)
    summaries = [s for run in runs.values() for s in run.summaries]
    settings_table = _settings_table(args, summaries, settings, ids)
    notes = [timing_note(name, run.info) for name, run in runs.items()]
    notes.append(f"total wall time of this run: {time.time() - start:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    for key, fname in TABLE_FILES.items():
        _write_csv(tables[key], os.path.join(args.out, fname))
    extra = {"records.csv": rows, "fits.csv": fits, "acceptance.csv": accept}
    for fname, records in extra.items():
        _write_csv(pd.DataFrame(records), os.path.join(args.out, fname))
    plot_figure6(rows, os.path.join(args.out, "figure6.png"))
    markdown = render_markdown(tables, settings_table, versions, accept, canonical_command(args),
                               time.strftime("%Y-%m-%d %H:%M:%S %Z"), notes)
    common.atomic_write_text(os.path.join(args.out, "tables.md"), markdown)
    common.write_json(os.path.join(args.out, "run.json"), common.provenance(
        vars(args), settings=settings_table, attack_settings=asdict(settings), image_ids=ids,
        models={name: run.info for name, run in runs.items()},
        outputs=sorted(list(TABLE_FILES.values()) + list(extra)
                       + ["figure6.png", "tables.md"]),
        seconds=time.time() - start))
    return markdown


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    if not args.verbose:
        # Each model gets its own compiled attacks, which TensorFlow reports as
        # "retracing" warnings; they are expected here and say nothing about results.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    start = time.time()
    for name in args.model_list:
        if not _model_exists(name, args.models_dir):
            raise ToolError(f"--models: unknown model {name!r}; use normal, distilled, brelu, "
                            f"2-layer or the stem of a file in {args.models_dir}/")
    from tqdm import tqdm

    import attacks
    import models

    common.set_seed(args.seed)
    test_data = models.load_dataset(args.dataset, args.data_dir).test_data
    if args.firstimg >= len(test_data):
        raise ToolError(f"--firstimg {args.firstimg} is beyond the {len(test_data)} test images")
    ids = list(range(args.firstimg, min(len(test_data), args.firstimg + args.numimg)))
    # Load every model first: a missing fourth model should fail now, not after an hour.
    loaded = {name: models.load_model(args.dataset, name, models_dir=args.models_dir)
              for name in args.model_list}
    settings = AttackSettings(
        cw_iterations=args.cw_iterations or attacks.paper_cw_iterations(args.dataset),
        cw_binary_steps=args.cw_binary_steps, cw_learning_rate=1e-2, cw_initial_const=1e-3,
        cw_confidence=0.0, ifgsm_iterations=args.ifgsm_iterations,
        linf_eps=tuple(attacks.PAPER_EPS_GRID), l2_eps=tuple(attacks.L2_EPS_GRID),
        ifgsm_losses=IFGSM_LOSSES[args.ifgsm_loss])
    os.makedirs(os.path.join(args.out, "cache"), exist_ok=True)
    own_ray = False
    try:
        if args.address is not None:
            import sweep_driver

            own_ray = sweep_driver.connect(address=_ray_address(args.address),
                                           num_cpus=args.num_cpus, ship_code="auto")
        with tqdm(total=5 * len(loaded), unit="step", file=sys.stderr, disable=args.no_progress,
                  desc="tables", dynamic_ncols=True) as steps:
            runs = {name: process_model(args, name, model, ids, test_data, settings, steps)
                    for name, model in loaded.items()}
    finally:
        if own_ray:
            import ray

            ray.shutdown()
    print(write_outputs(args, ids, runs, settings, start))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog=PROG))
