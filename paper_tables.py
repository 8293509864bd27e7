"""The paper's tables from stage-2 records and attack results (pure, no TensorFlow).

``reproduce_tables.py`` runs the stages and the attacks; this module turns
what they wrote into the paper's Tables 2 to 5, the attack-success and
acceptance tables, the Markdown of ``tables.md`` and the Figure 6 analogue.
Records are plain dicts (one per image and target, or per Weibull fit):
distances in the input's units ([-0.5, 0.5] pixels), bounds as clever.py
prints them.
"""
from __future__ import annotations

import enum
import io
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

import aggregate
import common
from common import Norm, ToolError

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

#: Table 2 columns (docs/paper_tables.md): column -> (source, norm); source is an
#: attack or "clever".
TABLE2_COLUMNS: dict[str, tuple[Attack | str, Norm]] = {
    "CW L2": (Attack.CW_L2, Norm.L2), "CW Linf": (Attack.CW_L2, Norm.LINF),
    "I-FGSM L2": (Attack.IFGSM_L2, Norm.L2), "I-FGSM Linf": (Attack.IFGSM_LINF, Norm.LINF),
    "CLEVER L2": ("clever", Norm.L2), "CLEVER Linf": ("clever", Norm.LINF)}

# --------------------------------------------------------------------------
# The paper's numbers (docs/paper_tables.md). digits stands in for MNIST.
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
    (CLEVER-u, :func:`aggregate.per_image_minimum`). ``n_classes`` is
    :func:`aggregate.n_classes`: the files of the row plus the true class (2
    for a targeted row, the data set's classes for a complete CLEVER-u).
    ``ids`` keeps only those images (the folder may hold files of an earlier,
    larger run).
    """
    wanted = None if ids is None else set(int(i) for i in ids)
    norms = (Norm.L1,) + TABLE_NORMS
    targeted_infos = {k.value for k in TARGETED_KINDS}
    rows: list[dict] = []
    class_files: list[tuple[int, dict[str, float]]] = []
    true_label: dict[int, int] = {}
    for rec in records:
        if wanted is not None and int(rec["id"]) not in wanted:
            continue
        info = str(rec["info"])
        if not (_is_class_info(info) if untargeted else info in targeted_infos):
            continue
        bounds = {f"clever_{n.label}": _num(rec["norms"][n.label]["bound"]) for n in norms}
        if untargeted:
            class_files.append((int(rec["id"]), bounds))
            true_label.setdefault(int(rec["id"]), int(rec["true_label"]))
            continue
        rows.append({"model": model, "id": int(rec["id"]), "true_label": int(rec["true_label"]),
                     "kind": info, "target": int(rec["target_label"]),
                     "n_classes": aggregate.n_classes(1), **bounds})
    for m in aggregate.per_image_minimum(class_files):
        rows.append({"model": model, "id": m.image, "true_label": true_label[m.image],
                     "kind": Kind.UNTARGETED.value, "target": -1, "n_classes": m.n_classes,
                     **m.values})
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
         "numbers (docs/paper_tables.md)."),
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
