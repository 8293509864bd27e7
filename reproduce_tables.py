#!/usr/bin/env python3
"""Reproduce the CLEVER paper's Tables 2 to 5 and Figure 6 on one data set.

For each model: stage 1 (``collect_gradients.py``) for the least-likely,
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
import contextlib
import enum
import functools
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

import common
from common import Norm, ToolError, check_positive

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
# The paper's radius for its tables (SPEC section 6), not stage 1's R = 3: the
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
#: Classes of every supported data set (untargeted runs have one file per other class).
NUM_CLASSES = 10
#: A fit "passes" the K-S test above this p-value (paper Table 5).
KS_ALPHA = 0.05
#: The issue's acceptance thresholds, in percent.
ACCEPT_CLEVER_BELOW_CW = 90.0
ACCEPT_KS_PASS = 90.0


class Kind(enum.Enum):
    """Which target a row is about; ``value`` is the stage-1 ``info`` (or untargeted)."""

    LEAST = "least"
    RANDOM = "random"
    TOP2 = "top2"
    UNTARGETED = "untargeted"


#: The paper's column order of Table 3.
TARGETED_KINDS: tuple[Kind, ...] = (Kind.LEAST, Kind.RANDOM, Kind.TOP2)
ALL_KINDS: tuple[Kind, ...] = TARGETED_KINDS + (Kind.UNTARGETED,)
KIND_LABEL = {Kind.LEAST: "least", Kind.RANDOM: "random", Kind.TOP2: "top-2",
              Kind.UNTARGETED: "untargeted"}


class Attack(enum.Enum):
    """The attacks run; ``value`` equals ``attacks.AttackName``'s (cached records use it)."""

    CW_L2 = "cw_l2"
    IFGSM_LINF = "ifgsm_li"
    IFGSM_L2 = "ifgsm_l2"


ATTACK_LABEL = {Attack.CW_L2: "CW", Attack.IFGSM_LINF: "I-FGSM Linf",
                Attack.IFGSM_L2: "I-FGSM L2"}

#: Bound norms in the tables (L1 bounds are computed by stage 2 but not tabulated).
TABLE_NORMS: tuple[Norm, ...] = (Norm.L2, Norm.LINF)
NORM_TITLE = {Norm.L1: "L1", Norm.L2: "L2", Norm.LINF: "Linf"}

#: Table 4 comparisons: column -> (attack, norm of the distortion and of CLEVER).
#: "CW Linf" is the L-infinity distortion of the CW L2 example: an upper bound
#: on the smallest L-infinity perturbation, not CW's own L-infinity attack.
TABLE4_COLUMNS: dict[str, tuple[Attack, Norm]] = {
    "CW L2": (Attack.CW_L2, Norm.L2), "I-FGSM L2": (Attack.IFGSM_L2, Norm.L2),
    "CW Linf": (Attack.CW_L2, Norm.LINF), "I-FGSM Linf": (Attack.IFGSM_LINF, Norm.LINF)}

#: Table 2 columns (SPEC section 6): column -> (source, norm); source is an
#: attack or "clever".
TABLE2_COLUMNS: dict[str, tuple[Attack | str, Norm]] = {
    "CW L2": (Attack.CW_L2, Norm.L2), "CW Linf": (Attack.CW_L2, Norm.LINF),
    "I-FGSM L2": (Attack.IFGSM_L2, Norm.L2), "I-FGSM Linf": (Attack.IFGSM_LINF, Norm.LINF),
    "CLEVER L2": ("clever", Norm.L2), "CLEVER Linf": ("clever", Norm.LINF)}

# --------------------------------------------------------------------------
# The paper's numbers (SPEC section 6). digits stands in for MNIST.
# --------------------------------------------------------------------------
#: Our model name -> (paper row, Table 2 numbers in TABLE2_COLUMNS order).
PAPER_TABLE2: dict[str, dict[str, tuple[str, tuple[float, ...]]]] = {
    "mnist": {
        "2-layer": ("MNIST-MLP", (1.113, 0.215, 3.564, 0.178, 0.819, 0.041)),
        "normal": ("MNIST-CNN", (1.500, 0.455, 4.439, 0.288, 0.721, 0.057)),
        "distilled": ("MNIST-DD", (1.548, 0.409, 5.617, 0.283, 0.865, 0.063)),
        "brelu": ("MNIST-BReLU", (1.337, 0.433, 3.851, 0.285, 0.833, 0.065)),
    },
    "cifar": {
        "2-layer": ("CIFAR-MLP", (0.253, 0.018, 0.885, 0.016, 0.219, 0.005)),
        "normal": ("CIFAR-CNN", (0.195, 0.023, 0.721, 0.018, 0.072, 0.002)),
        "distilled": ("CIFAR-DD", (0.285, 0.032, 1.136, 0.024, 0.130, 0.004)),
        "brelu": ("CIFAR-BReLU", (0.159, 0.019, 0.519, 0.013, 0.045, 0.001)),
    },
}
#: Table 3 (targeted L2): (CW, CLEVER) for least, random, top-2.
PAPER_TABLE3: dict[str, dict[str, tuple[str, tuple[float, ...]]]] = {
    "mnist": {"normal": ("MNIST-CNN", (2.377, 1.257, 2.005, 1.227, 1.504, 0.987))},
    "cifar": {"normal": ("CIFAR-CNN", (0.836, 0.156, 0.372, 0.146, 0.188, 0.123))},
}
PAPER_DATASET = {"digits": "mnist", "mnist": "mnist", "cifar": "cifar"}
PAPER_NOTES = (
    "Paper settings: N_b = 500, N_s = 1024, R = 5, 500 test images (MNIST, CIFAR), CW with "
    "2000 iterations on MNIST (1000 on CIFAR), I-FGSM with 50 iterations and the best eps "
    "of the grid. The paper gives Tables 4 and 5 for ImageNet models only: CLEVER exceeds "
    "the CW L2 distortion for at most 4% of images on MobileNet and ResNet-50 (25% on "
    "Inception-v3) and never for L-infinity; the K-S test does not reject the reverse "
    "Weibull fit (p > 0.05) for 93-100% of fits on every model.")


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
# Records from stage 2 and the attacks (pure)
# --------------------------------------------------------------------------
#: ``status`` of a fit that used the reverse Weibull location (clever.FitStatus.FIT).
FIT_STATUS = "fit"


def _num(value) -> float:
    """A JSON number (null for non-finite in clever.py's summaries) as a float."""
    return math.nan if value is None else float(value)


def _is_class_info(info: str) -> bool:
    """True for the info ``class<j>`` of an untargeted (every class) stage-1 file."""
    prefix = common.TargetKind.ALL.value
    return info.startswith(prefix) and info[len(prefix):].isdigit()


def clever_rows(records: Iterable[Mapping], model: str, ids: Sequence[int] | None = None,
                untargeted: bool = False) -> list[dict]:
    """CLEVER scores per (image, target) from clever.py summary ``records``.

    Targeted: one row per file whose info is least/random/top2, with the
    capped bounds ``clever_L1/L2/Li`` (input units). Untargeted: one row per
    image, each bound the minimum over that image's class<j> files
    (CLEVER-u), ``n_classes`` the number of files. ``ids`` keeps only those
    images (the folder may hold files of an earlier, larger run).
    """
    wanted = None if ids is None else set(int(i) for i in ids)
    rows: list[dict] = []
    groups: dict[int, list[Mapping]] = {}
    for rec in records:
        if wanted is not None and int(rec["id"]) not in wanted:
            continue
        info = str(rec["info"])
        if untargeted:
            if _is_class_info(info):
                groups.setdefault(int(rec["id"]), []).append(rec)
            continue
        if info not in {k.value for k in TARGETED_KINDS}:
            continue
        row = {"model": model, "id": int(rec["id"]), "true_label": int(rec["true_label"]),
               "kind": info, "target": int(rec["target_label"]), "n_classes": 1}
        for norm in (Norm.L1,) + TABLE_NORMS:
            row[f"clever_{norm.label}"] = _num(rec["norms"][norm.label]["bound"])
        rows.append(row)
    for img_id in sorted(groups):
        group = groups[img_id]
        row = {"model": model, "id": img_id, "true_label": int(group[0]["true_label"]),
               "kind": Kind.UNTARGETED.value, "target": -1, "n_classes": len(group)}
        for norm in (Norm.L1,) + TABLE_NORMS:
            row[f"clever_{norm.label}"] = float(min(_num(r["norms"][norm.label]["bound"])
                                                    for r in group))
        rows.append(row)
    rows.sort(key=lambda r: (r["id"], ALL_KINDS.index(Kind(r["kind"])), r["target"]))
    return rows


def fit_rows(records: Iterable[Mapping], model: str, ids: Sequence[int] | None = None) -> list[dict]:
    """One row per Weibull fit (file x bound norm): p-value, status, pass/fail of K-S."""
    wanted = None if ids is None else set(int(i) for i in ids)
    rows = []
    for rec in records:
        if wanted is not None and int(rec["id"]) not in wanted:
            continue
        info = str(rec["info"])
        for label, fit in rec["norms"].items():
            pval = _num(fit.get("pval"))
            rows.append({"model": model, "id": int(rec["id"]), "info": info,
                         "mode": "untargeted" if _is_class_info(info) else "targeted",
                         "target": int(rec["target_label"]), "norm": label, "pval": pval,
                         "status": fit.get("status", ""), "fallback": bool(fit.get("fallback")),
                         "ks_pass": bool(fit.get("status") == FIT_STATUS and pval > KS_ALPHA)})
    return rows


def attack_key(attack: Attack, img_id: int, target: int) -> str:
    """Key of one cached attack result; ``target`` is -1 for untargeted."""
    return f"{attack.value}|{int(img_id)}|{int(target)}"


def merge_attacks(rows: Sequence[Mapping], results: Mapping[str, Mapping]) -> list[dict]:
    """Add ``<attack>_L2``, ``<attack>_Li`` (inf where it failed) and ``<attack>_success``.

    ``results`` maps :func:`attack_key` to cached records (``success``,
    ``l2``, ``linf``; null distortions for failures). A missing result is an
    error: every row must have been attacked.
    """
    out = []
    for row in rows:
        new = dict(row)
        for attack in Attack:
            rec = results.get(attack_key(attack, row["id"], row["target"]))
            if rec is None:
                raise ToolError(f"no {attack.value} result for image {row['id']} target "
                                f"{row['target']} of model {row['model']}")
            ok = bool(rec["success"])
            new[f"{attack.value}_success"] = ok
            new[f"{attack.value}_L2"] = _num(rec["l2"]) if ok else math.inf
            new[f"{attack.value}_Li"] = _num(rec["linf"]) if ok else math.inf
        out.append(new)
    return out


# --------------------------------------------------------------------------
# Tables (pure: records in, DataFrames out)
# --------------------------------------------------------------------------
def _mean_finite(values) -> float:
    """Mean over finite entries: an attack's failures (inf) are counted apart."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _column(source, norm: Norm) -> str:
    return f"clever_{norm.label}" if source == "clever" else f"{source.value}_{norm.label}"


def _models_in_order(df) -> list[str]:
    return list(dict.fromkeys(df["model"]))


def table2(records, paper_rows: Mapping[str, tuple[str, tuple[float, ...]]] | None = None):
    """Table 2 analogue: per model, means over images of untargeted distortions and CLEVER-u.

    Attack columns average the images the attack broke (failures are in
    :func:`success_table`); CLEVER columns average every image. Columns:
    model, source ("ours" or the paper's row), images, then TABLE2_COLUMNS.
    """
    import pandas as pd

    df = pd.DataFrame(list(records))
    df = df[df["kind"] == Kind.UNTARGETED.value]
    rows = []
    for model in _models_in_order(df):
        sub = df[df["model"] == model]
        row = {"model": model, "source": "ours", "images": int(len(sub))}
        for col, (source, norm) in TABLE2_COLUMNS.items():
            row[col] = _mean_finite(sub[_column(source, norm)])
        rows.append(row)
        if paper_rows and model in paper_rows:
            name, values = paper_rows[model]
            rows.append({"model": model, "source": f"paper {name}", "images": 500,
                         **dict(zip(TABLE2_COLUMNS, values))})
    return pd.DataFrame(rows, columns=["model", "source", "images", *TABLE2_COLUMNS])


def table3(records, paper_rows: Mapping[str, tuple[str, tuple[float, ...]]] | None = None):
    """Table 3 analogue: per model, mean CW L2 distortion and mean CLEVER L2 per target kind.

    Columns: model, source, pairs, then ``<kind> CW`` and ``<kind> CLEVER``
    for least, random, top-2 (the paper's order).
    """
    import pandas as pd

    df = pd.DataFrame(list(records))
    cols = [f"{KIND_LABEL[k]} {what}" for k in TARGETED_KINDS for what in ("CW", "CLEVER")]
    rows = []
    for model in _models_in_order(df):
        sub = df[(df["model"] == model) & (df["kind"] != Kind.UNTARGETED.value)]
        if sub.empty:
            continue
        row = {"model": model, "source": "ours", "pairs": int(len(sub))}
        for kind in TARGETED_KINDS:
            part = sub[sub["kind"] == kind.value]
            row[f"{KIND_LABEL[kind]} CW"] = _mean_finite(part[_column(Attack.CW_L2, Norm.L2)])
            row[f"{KIND_LABEL[kind]} CLEVER"] = _mean_finite(part["clever_L2"])
        rows.append(row)
        if paper_rows and model in paper_rows:
            name, values = paper_rows[model]
            rows.append({"model": model, "source": f"paper {name}", "pairs": 1500,
                         **dict(zip(cols, values))})
    return pd.DataFrame(rows, columns=["model", "source", "pairs", *cols])


def exceeds(clever, distortion) -> np.ndarray:
    """[n] bool: the CLEVER score is above the attack's distortion (never for failures, inf)."""
    return np.asarray(clever, np.float64) > np.asarray(distortion, np.float64)


def _model_kind_groups(df):
    """(model, kind, rows) for each model and target kind present, in table order."""
    for model in _models_in_order(df):
        for kind in ALL_KINDS:
            sub = df[(df["model"] == model) & (df["kind"] == kind.value)]
            if not sub.empty:
                yield model, kind, sub


def table4(records):
    """Table 4: percentage of (image, target) pairs whose CLEVER score exceeds the distortion.

    One row per model and kind (least, random, top-2, untargeted); a column
    per TABLE4_COLUMNS comparison, in percent of ``n`` (failed attacks count
    as not exceeded).
    """
    import pandas as pd

    rows = []
    for model, kind, sub in _model_kind_groups(pd.DataFrame(list(records))):
        row = {"model": model, "target": KIND_LABEL[kind], "n": int(len(sub))}
        for col, (attack, norm) in TABLE4_COLUMNS.items():
            hit = exceeds(sub[f"clever_{norm.label}"], sub[f"{attack.value}_{norm.label}"])
            row[col] = 100.0 * float(hit.mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "target", "n", *TABLE4_COLUMNS])


def table5(fits):
    """Table 5: per model, percentage of Weibull fits with K-S p-value above KS_ALPHA.

    Columns per mode (targeted, untargeted) and bound norm (L2, Linf), then
    over all fits (L1, L2, Linf), the number of fits and of fallbacks to
    max(S) (counted as not passing).
    """
    import pandas as pd

    df = pd.DataFrame(list(fits))
    rows = []
    for model in _models_in_order(df):
        sub = df[df["model"] == model]
        row = {"model": model}
        for mode in ("targeted", "untargeted"):
            for norm in TABLE_NORMS:
                part = sub[(sub["mode"] == mode) & (sub["norm"] == norm.label)]
                row[f"{mode} {NORM_TITLE[norm]}"] = (100.0 * float(part["ks_pass"].mean())
                                                     if len(part) else math.nan)
        row["all fits"] = 100.0 * float(sub["ks_pass"].mean())
        row["fits"] = int(len(sub))
        row["fallbacks"] = int(sub["fallback"].sum())
        rows.append(row)
    cols = ["model"] + [f"{m} {NORM_TITLE[n]}" for m in ("targeted", "untargeted")
                        for n in TABLE_NORMS] + ["all fits", "fits", "fallbacks"]
    return pd.DataFrame(rows, columns=cols)


def success_table(records):
    """Attack success rates in percent, per model and kind (failures leave Table 2's means)."""
    import pandas as pd

    rows = []
    for model, kind, sub in _model_kind_groups(pd.DataFrame(list(records))):
        row = {"model": model, "target": KIND_LABEL[kind], "n": int(len(sub))}
        for attack in Attack:
            row[ATTACK_LABEL[attack]] = 100.0 * float(sub[f"{attack.value}_success"].mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "target", "n", *ATTACK_LABEL.values()])


def acceptance(records, fits) -> list[dict]:
    """The issue's checks per model and overall: CLEVER L2 < CW L2 on targeted pairs; K-S pass.

    Returns rows {scope, check, value (percent), n, threshold, passed}.
    """
    import pandas as pd

    df = pd.DataFrame(list(records))
    df = df[df["kind"] != Kind.UNTARGETED.value]
    fd = pd.DataFrame(list(fits))
    out = []
    scopes = _models_in_order(df) + ["all models"]
    for scope in scopes:
        sub = df if scope == "all models" else df[df["model"] == scope]
        fsub = fd if scope == "all models" else fd[fd["model"] == scope]
        below = np.asarray(sub["clever_L2"], float) < np.asarray(sub["cw_l2_L2"], float)
        value = 100.0 * float(below.mean()) if len(sub) else math.nan
        out.append({"scope": scope, "check": "CLEVER L2 < CW L2 distortion (targeted pairs)",
                    "value": value, "n": int(len(sub)), "threshold": ACCEPT_CLEVER_BELOW_CW,
                    "passed": bool(value >= ACCEPT_CLEVER_BELOW_CW)})
        value = 100.0 * float(fsub["ks_pass"].mean()) if len(fsub) else math.nan
        out.append({"scope": scope, "check": f"K-S p > {KS_ALPHA} (all fits)", "value": value,
                    "n": int(len(fsub)), "threshold": ACCEPT_KS_PASS,
                    "passed": bool(value >= ACCEPT_KS_PASS)})
    return out


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(float(value), fmt)
    return str(value).replace("|", "\\|")


def markdown_table(df, fmt: str = ".3f", formats: Mapping[str, str] | None = None) -> str:
    """A GitHub Markdown table of a DataFrame; numbers right-aligned, floats with ``fmt``."""
    formats = dict(formats or {})
    cols = list(df.columns)
    numeric = [df[c].dtype.kind in "iuf" for c in cols]
    lines = ["| " + " | ".join(str(c) for c in cols) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for values in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, formats.get(c, fmt))
                                       for c, v in zip(cols, values)) + " |")
    return "\n".join(lines)


def render_markdown(tables: Mapping[str, object], settings: Mapping[str, object],
                    versions: Mapping[str, str], accept: Sequence[Mapping], command: str,
                    produced: str, notes: Sequence[str] = ()) -> str:
    """The whole ``tables.md``: provenance and settings first, then the tables."""
    import pandas as pd

    out = [f"# CLEVER scores and attack distortions: {settings['dataset']}", "",
           f"Produced by `{command}` on {produced}.", "", "## Settings", "",
           markdown_table(pd.DataFrame({"setting": list(settings),
                                        "value": [str(v) for v in settings.values()]})),
           "", "## Versions", "",
           markdown_table(pd.DataFrame({"package": list(versions),
                                        "version": list(versions.values())})),
           "", "## Reference", "", PAPER_NOTES, ""]
    pct = {c: ".1f" for c in ("CW L2", "I-FGSM L2", "CW Linf", "I-FGSM Linf")}
    sections = [
        ("Table 2: untargeted, mean over images", "table2", {},
         "CW and I-FGSM: mean distortion over the images the attack broke (success rates "
         "below); CLEVER: mean over images of CLEVER-u (minimum over target classes), capped "
         "at the sampling radius. 'CW Linf' is the L-infinity distortion of the CW L2 example "
         "(the paper ran CW's L-infinity attack). 'I-FGSM L2' is the L2 variant of I-FGSM "
         "(normalised gradient steps); the L2 distortion of the I-FGSM L-infinity examples is "
         "column ifgsm_li_L2 of records.csv. Rows 'paper ...' are the published MNIST/CIFAR "
         "numbers (SPEC section 6)."),
        ("Table 3: targeted, L2, mean CW distortion / mean CLEVER score", "table3", {},
         "Over the (image, target) pairs of each target kind; the targets are those the "
         "stage-1 files record."),
        ("Table 4: percentage of pairs whose CLEVER score exceeds the attack's distortion",
         "table4", pct,
         "A CLEVER score above an attack's distortion is a certified-looking bound that an "
         "actual adversarial example violates; failed attacks count as not exceeded."),
        ("Table 5: percentage of Weibull fits with K-S p-value > 0.05", "table5",
         {c: ".1f" for c in ("targeted L2", "targeted Linf", "untargeted L2",
                             "untargeted Linf", "all fits")},
         "Every file and bound norm is one fit; fallbacks to max(S) (ill-conditioned or "
         "degenerate maxima) count as not passing."),
        ("Attack success rates (percent)", "success",
         {ATTACK_LABEL[a]: ".1f" for a in Attack}, ""),
    ]
    for title, key, formats, note in sections:
        out += [f"## {title}", "", markdown_table(tables[key], formats=formats), ""]
        if note:
            out += [note, ""]
    out += ["## Acceptance checks (issue 7)", ""]
    acc = pd.DataFrame(list(accept))
    acc = acc.assign(value=acc["value"].map(lambda v: f"{v:.1f}%"),
                     threshold=acc["threshold"].map(lambda v: f">= {v:g}%"),
                     passed=acc["passed"].map(lambda v: "PASS" if v else "FAIL"))
    out += [markdown_table(acc), ""]
    if notes:
        out += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    out += ["Figure: `figure6.png` (per image, CLEVER L2 beside the CW L2 distortion).", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Figure 6 analogue
# --------------------------------------------------------------------------
def plot_figure6(records, path: str) -> None:
    """Per model, per image: CW L2 distortion and CLEVER L2 score, images sorted by CW.

    Top row: untargeted (CLEVER-u); bottom row: top-2 targets. PNG via the
    Agg canvas, written atomically.
    """
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = pd.DataFrame(list(records))
    model_names = _models_in_order(df)
    kinds = (Kind.UNTARGETED, Kind.TOP2)
    fig = Figure(figsize=(3.6 * len(model_names) + 0.8, 6.4))
    FigureCanvasAgg(fig)
    for col, model in enumerate(model_names):
        for row, kind in enumerate(kinds):
            ax = fig.add_subplot(len(kinds), len(model_names), row * len(model_names) + col + 1)
            sub = df[(df["model"] == model) & (df["kind"] == kind.value)]
            cw = np.asarray(sub["cw_l2_L2"], float)
            cl = np.asarray(sub["clever_L2"], float)
            order = np.argsort(np.where(np.isfinite(cw), cw, np.inf), kind="stable")
            x = np.arange(len(order))
            ax.vlines(x, np.minimum(cw[order], cl[order]), np.where(np.isfinite(cw[order]),
                      np.maximum(cw[order], cl[order]), cl[order]), color="0.8", lw=1)
            ax.plot(x, np.where(np.isfinite(cw[order]), cw[order], np.nan), "o", ms=4,
                    color="tab:red", label="CW L2 distortion")
            ax.plot(x, cl[order], "x", ms=5, color="tab:blue", label="CLEVER L2")
            below = int(np.sum(cl < cw))
            ax.set_title(f"{model}, {KIND_LABEL[kind]}: CLEVER < CW {below}/{len(sub)}",
                         fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([str(i) for i in np.asarray(sub["id"])[order]], rotation=90,
                               fontsize=5)
            ax.tick_params(axis="y", labelsize=7)
            if col == 0:
                ax.set_ylabel("L2 distance", fontsize=8)
            if row == len(kinds) - 1:
                ax.set_xlabel("image id (sorted by CW distortion)", fontsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.suptitle("CLEVER L2 score and CW L2 distortion per image (Figure 6 analogue)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    common.atomic_write(path, lambda fh: fh.write(buf.getvalue()))


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


def run_stage1(args, model: str, save: str, targets: str, log_path: str) -> int:
    """Stage 1 of ``model``, its stdout lines into ``log_path``; returns new files.

    In this process (``collect_gradients.main``) or, with ``--address``, as a
    ``sweep.py`` job on Ray: the same flags, the same files (bit for bit) in
    the same folder."""
    import collect_gradients

    folder = common.output_dir(save, args.dataset, model)
    before = len(_mat_files(folder))
    shared = ["--dataset", args.dataset, "--models_dir", args.models_dir,
              "--data_dir", args.data_dir, "--numimg", str(args.numimg),
              "--firstimg", str(args.firstimg), "--Nsamps", str(args.Nsamps),
              "--Niters", str(args.Niters), "--radius", repr(args.radius),
              "--seed", str(args.seed), "--targets", targets,
              "--save", save] + (["--overwrite"] if args.overwrite else []) \
        + (["--no_progress"] if args.no_progress else [])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as fh, contextlib.redirect_stdout(fh):
        if args.address is None:
            argv = ["--model_name", model] + shared
            print(f"# collect_gradients.py {' '.join(argv)}")
            collect_gradients.main(collect_gradients.parse_args(argv))
        else:
            import sweep

            out = os.path.join(os.path.dirname(log_path),
                               os.path.splitext(os.path.basename(log_path))[0] + "_sweep")
            argv = ["--models", model, "--address", _ray_address(args.address),
                    "--workers", str(args.workers), "--no_stage2", "--out", out] + shared
            print(f"# sweep.py {' '.join(argv)}", flush=True)
            if sweep.main(sweep.parse_args(argv)) != 0:
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
# Attacks (TensorFlow), cached per (attack, image, target)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackSettings:
    """Everything an attack result depends on besides the model, image and target."""

    cw_iterations: int
    cw_binary_steps: int
    cw_learning_rate: float
    cw_initial_const: float
    cw_confidence: float
    ifgsm_iterations: int
    linf_eps: tuple[float, ...]
    l2_eps: tuple[float, ...]
    ifgsm_losses: tuple[str, ...]   # tried in order, each on the failures of the one before

    def of(self, attack: Attack) -> dict:
        """The settings ``attack``'s results depend on (so I-FGSM changes keep CW's cache)."""
        fields = {Attack.CW_L2: ("cw_iterations", "cw_binary_steps", "cw_learning_rate",
                                 "cw_initial_const", "cw_confidence"),
                  Attack.IFGSM_LINF: ("ifgsm_iterations", "linf_eps", "ifgsm_losses"),
                  Attack.IFGSM_L2: ("ifgsm_iterations", "l2_eps", "ifgsm_losses")}[attack]
        return {f: getattr(self, f) for f in fields}

    def key(self, attack: Attack, dataset: str, model: str, digest: str) -> str:
        """Cache key of ``attack``'s results on a model (weights ``digest``)."""
        text = json.dumps({"attack": attack.value, "dataset": dataset, "model": model,
                           "weights": digest, "settings": self.of(attack)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_attack_cache(path: str) -> dict[str, dict]:
    """Cached records by :func:`attack_key`; an unreadable cache is recomputed, not fatal."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {attack_key(Attack(r["attack"]), r["id"], r["target"]): r
                for r in data["records"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable attack cache (%s); recomputing", path, err)
        return {}


def write_attack_cache(path: str, attack: Attack, records: Mapping[str, Mapping],
                       settings: AttackSettings, dataset: str, model: str, digest: str) -> None:
    """Write ``attack``'s records (of all in ``records``) with what produced them."""
    items = sorted((r for r in records.values() if r["attack"] == attack.value),
                   key=lambda r: (r["id"], r["target"]))
    common.write_json(path, {"provenance": common.provenance(), "attack": attack.value,
                             "dataset": dataset, "model": model, "weights_sha256": digest,
                             "settings": settings.of(attack), "records": items})


def _finite(value: float):
    return float(value) if math.isfinite(value) else None


def _attack_record(attack: Attack, img_id: int, target: int, res, k: int, seconds: float,
                   loss: str | None) -> dict:
    """The JSON record of result ``k`` of an AttackResult (null distortions for failures)."""
    rec = {"attack": attack.value, "id": int(img_id), "target": int(target),
           "label": int(res.labels[k]), "success": bool(res.success[k]),
           "l1": _finite(res.l1[k]), "l2": _finite(res.l2[k]), "linf": _finite(res.linf[k]),
           "seconds_batch": seconds}
    if loss is not None:
        rec["loss"] = loss
    if res.eps is not None:
        rec["eps"] = _finite(res.eps[k])
    if res.const is not None:
        rec["const"] = None if math.isnan(res.const[k]) else float(res.const[k])
    return rec


def run_attacks(model, images: Mapping[int, np.ndarray], pairs: Sequence[tuple[int, int]],
                untargeted_ids: Sequence[int], settings: AttackSettings,
                cached: dict[str, dict], save,
                only: Sequence[Attack] = tuple(Attack)) -> tuple[dict[str, dict], int]:
    """Attack what ``cached`` lacks; returns (all records, number computed now).

    ``images``: id -> [H, W, C] float32 in the data range; ``pairs``:
    (id, target class) for the targeted attacks; ``untargeted_ids``: images
    attacked away from their predicted class. I-FGSM runs with each loss of
    ``settings.ifgsm_losses`` in turn on what the previous one failed: the
    cross-entropy gradient vanishes where float32 softmax saturates (the
    distilled model's huge logits), the logit margin's does not. Each record
    says which loss succeeded. ``save`` is called after each attack
    batch (``save(attack, records)``), so an interrupted run keeps what it finished.
    ``only``: the attacks to run (default all).
    """
    import attacks

    cw = attacks.CarliniWagnerL2(
        model, max_iterations=settings.cw_iterations,
        binary_search_steps=settings.cw_binary_steps, learning_rate=settings.cw_learning_rate,
        initial_const=settings.cw_initial_const, confidence=settings.cw_confidence)

    def ifgsm(norm, grid):
        return [(loss, attacks.IterativeFGSM(model, norm=norm, eps_grid=grid,
                                             iterations=settings.ifgsm_iterations,
                                             loss=attacks.IFGSMLoss(loss)))
                for loss in settings.ifgsm_losses]

    runners = {Attack.CW_L2: [(None, cw)],
               Attack.IFGSM_LINF: ifgsm(Norm.LINF, settings.linf_eps),
               Attack.IFGSM_L2: ifgsm(Norm.L2, settings.l2_eps)}
    records = dict(cached)
    computed = 0
    jobs = [(a, list(pairs), True) for a in only] + \
        [(a, [(i, -1) for i in untargeted_ids], False) for a in only]
    for attack, items, targeted in jobs:
        todo = [(i, t) for i, t in items if attack_key(attack, i, t) not in records]
        if not todo:
            continue
        log.info("%s %s: attacking %d (%d cached)", attack.value,
                 "targeted" if targeted else "untargeted", len(todo), len(items) - len(todo))
        x = np.stack([images[i] for i, _ in todo]).astype(np.float32)
        targets = np.array([t for _, t in todo]) if targeted else None
        left = np.arange(len(todo))
        for attempt, (loss, runner) in enumerate(runners[attack]):
            if left.size == 0:
                break
            if attempt:
                log.info("%s: retrying %d failures with the %s loss", attack.value, left.size,
                         loss)
            t0 = time.time()
            res = runner(x[left], targets=None if targets is None else targets[left])
            seconds = time.time() - t0
            for k, idx in enumerate(left):
                img_id, target = todo[idx]
                records[attack_key(attack, img_id, target)] = _attack_record(
                    attack, img_id, target, res, k, seconds, loss)
            left = left[~res.success]
        computed += len(todo)
        save(attack, records)
    return records, computed


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
                  and r["n_classes"] != NUM_CLASSES - 1]
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
            import sweep

            own_ray = sweep.connect(argparse.Namespace(
                address=_ray_address(args.address), num_cpus=args.num_cpus, ship_code="auto"))
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
