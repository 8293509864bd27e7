"""The summaries of a sweep (pure: stage-2 records in, rows and files out).

:func:`summarize` turns the records of ``sweep.py``'s stage-2 tasks (one per
file, each with its ``job`` label, ``sweep_jobs.job_labels``) into rows per
job, info and bound norm, aggregated by ``aggregate.py`` exactly as
``clever.py`` aggregates a folder; :func:`write_outputs` writes summary.csv,
summary.md, records.json, records.csv and provenance.json (docs/sweeps.md).
No Ray, no TensorFlow.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os

import numpy as np

import aggregate
import common
import interval
from aggregate import Reduce
from stage2_files import is_untargeted_info

log = logging.getLogger("clever.sweep")

#: A K-S p-value above this does not reject the reverse Weibull fit (paper Table 5).
KS_ALPHA = 0.05
#: Bound norms of the summary, in print order (L1, L2, Li).
_NORM_LABELS = ("L1", "L2", "Li")
#: Per-file numbers of a norm that a summary row reduces -> the stem of its columns
#: (``mean_<stem>``, ``min_<stem>``).
SUMMARY_FIELDS = {"bound": "clever", "bound_uncapped": "clever_uncapped"}
#: Info of a job's row that takes, per image, the minimum over its targeted files
#: (top2/random/least/user): a minimum over those targets only, not CLEVER-u.
MIN_OVER_TARGETS = "min_over_targets"
#: Info of the row of a job with ``--targets all`` files (class<j>, every other class):
#: per image the minimum over all its files, CLEVER-u as ``clever.py --untargeted``.
UNTARGETED = "untargeted"


def _summary_rows(info: str, recs: list[dict], per_image: bool) -> list[dict]:
    """One row per bound norm of ``recs`` (one job's files) under ``info``.

    ``per_image``: each image's minimum over its files first, then mean and
    minimum over images; else mean and minimum over the files. ``files``,
    ``ks_pass_rate`` and ``fallbacks`` count every fit that entered the row.
    """
    first = recs[0]
    rows = []
    for label in _NORM_LABELS:
        if label not in first["norms"]:
            continue
        fits = [r["norms"][label] for r in recs]
        per_file = [(r["id"], {f: r["norms"][label][f] for f in SUMMARY_FIELDS}) for r in recs]
        values = ([m.values for m in aggregate.per_image_minimum(per_file)] if per_image
                  else [v for _, v in per_file])
        mean = aggregate.reduce_fields(values, Reduce.MEAN)
        low = aggregate.reduce_fields(values, Reduce.MIN)
        row = {"job": first["job"], "model": first["model"], "dataset": first["dataset"],
               "info": info, "norm": label}
        for f, stem in SUMMARY_FIELDS.items():
            row[f"mean_{stem}"], row[f"min_{stem}"] = mean[f], low[f]
        if all(f"{f}_lo" in n for n in fits for f in SUMMARY_FIELDS):
            row.update(_interval_columns(recs, label, per_image))
        pvals = np.array([n["pval"] for n in fits], np.float64)
        row.update(images=len({r["id"] for r in recs}), files=len(recs),
                   ks_pass_rate=float(np.mean(pvals > KS_ALPHA)),
                   fallbacks=int(sum(n["status"] not in ("fit", "maxsamp") for n in fits)))
        rows.append(row)
    return rows


def _interval_columns(recs: list[dict], label: str, per_image: bool) -> dict:
    """``mean_clever_lo``, ``mean_clever_hi``, ``min_clever_lo``, ... of one row: the
    seed's sampling interval of each summary (interval.summary_interval: these
    files, not the choice of images; files of an image share their samples)."""
    out = {}
    for f, stem in SUMMARY_FIELDS.items():
        rows = [(r["id"], r["norms"][label][f], r["norms"][label][f"{f}_lo"],
                 r["norms"][label][f"{f}_hi"]) for r in recs]
        rows = [tuple(math.nan if v is None else v for v in row) for row in rows]
        if per_image:
            by_image = aggregate.group((row[0], row) for row in rows)
            rows = [(img, min(r[1] for r in g),
                     *interval.summary_interval([r[1] for r in g], [r[2] for r in g],
                                                [r[3] for r in g], "min"))
                    for img, g in sorted(by_image.items())]
        ids, b, lo, hi = ([row[i] for row in rows] for i in range(4))
        out[f"mean_{stem}_lo"], out[f"mean_{stem}_hi"] = interval.summary_interval(
            b, lo, hi, "mean", groups=ids)
        out[f"min_{stem}_lo"], out[f"min_{stem}_hi"] = interval.summary_interval(
            b, lo, hi, "min")
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Rows per (job, info, norm): mean/min CLEVER capped and uncapped, images, K-S pass rate.

    Per job (``record["job"]``, sorted) one row per targeted info and norm
    over its files, as ``clever.py`` prints them; then, where the job has two
    targeted infos or more, a ``min_over_targets`` row (per image the minimum
    over those files); where it has class<j> files (``--targets all``), an
    ``untargeted`` row (per image the minimum over every file of the image,
    CLEVER-u, as ``clever.py --untargeted``). A minimum never spans jobs.
    """
    rows = []
    by_job = aggregate.group((r["job"], r) for r in records)
    for job in sorted(by_job):
        recs = by_job[job]
        targeted = [r for r in recs if not is_untargeted_info(r["info"])]
        per_info = aggregate.group((r["info"], r) for r in targeted)
        for info in sorted(per_info):
            rows += _summary_rows(info, per_info[info], per_image=False)
        if len(per_info) > 1:
            rows += _summary_rows(MIN_OVER_TARGETS, targeted, per_image=True)
        if len(targeted) < len(recs):
            classes = aggregate.group((r["id"], r) for r in recs if is_untargeted_info(r["info"]))
            most = max(len(v) for v in classes.values())
            short = sorted(i for i, v in classes.items() if len(v) < most)
            if short:
                log.warning("%s: images %s lack some class files; their untargeted score is a "
                            "minimum over fewer classes", job, short)
            rows += _summary_rows(UNTARGETED, recs, per_image=True)
    return rows


_SUMMARY_COLUMNS = ("job", "model", "dataset", "info", "norm", "mean_clever", "min_clever",
                    "mean_clever_uncapped", "min_clever_uncapped", "images", "files",
                    "ks_pass_rate", "fallbacks")


#: Columns of sweep --interval: each summary's seed interval (docs/intervals.md).
_INTERVAL_COLUMNS = tuple(f"{s}_{stem}_{end}" for stem in SUMMARY_FIELDS.values()
                          for s in ("mean", "min") for end in ("lo", "hi"))


def _fmt(v) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def write_outputs(out: str, rows: list[dict], records: list[dict], provenance: dict) -> None:
    from stage2 import json_safe

    os.makedirs(out, exist_ok=True)
    columns = _SUMMARY_COLUMNS
    if rows and all("mean_clever_lo" in row for row in rows):   # sweep --interval
        columns = _SUMMARY_COLUMNS + _INTERVAL_COLUMNS
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([row[c] for c in columns])
    common.atomic_write_text(os.path.join(out, "summary.csv"), buf.getvalue())

    md = ["| " + " | ".join(columns) + " |",
          "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    common.atomic_write_text(os.path.join(out, "summary.md"),
                             "# CLEVER sweep\n\nRows per job, info and bound norm. Bounds "
                             "capped at the sampling radius (`_uncapped`: the original tool's "
                             f"numbers); `{MIN_OVER_TARGETS}`: per image the minimum over the "
                             f"job's targets (not CLEVER-u); `{UNTARGETED}`: per image the "
                             "minimum over every other class (`--targets all`); K-S pass rate: "
                             f"share of fits with p > {KS_ALPHA}.\n\n" + "\n".join(md) + "\n")

    common.write_json(os.path.join(out, "records.json"), json_safe(records))
    fields = ("job", "model", "dataset", "path", "id", "true_label", "target_label", "info",
              "order", "g_x0", "node")
    norm_fields = ("key", "estimate", "shape", "loc", "scale", "ks", "pval", "status", "bound",
                   "bound_uncapped", "cap")
    if records and all("bound_lo" in n for r in records for n in r["norms"].values()):
        norm_fields += ("bound_lo", "bound_hi", "bound_uncapped_lo", "bound_uncapped_hi",
                        "estimate_lo", "estimate_hi")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(fields) + [f"{n}_{k}" for n in _NORM_LABELS for k in norm_fields])
    for r in records:
        row = [r.get(k, "") for k in fields]
        for n in _NORM_LABELS:
            rec = r["norms"].get(n, {})
            row += ["" if rec.get(k) is None else rec.get(k, "") for k in norm_fields]
        w.writerow(row)
    common.atomic_write_text(os.path.join(out, "records.csv"), buf.getvalue())
    common.write_json(os.path.join(out, "provenance.json"), json_safe(provenance))
