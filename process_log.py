#!/usr/bin/env python3
"""Summarise clever.py logs: the original tool's log processor.

Reads the standard output of ``clever.py`` (this toolkit's, or the original
tool's as saved with ``python clever.py ... | tee clever_mnist_normal.log``),
parses every ``[DEBUG][L1]`` line (one per stage-1 file and bound norm) into a
table, and reports per model, info (top2, random, least, class<j>) and bound
norm the mean CLEVER score over all fits, the mean over the *usable* fits
(K-S p-value > 0.05 and fitted shape < 1000, the original's filter) and the
usable percentage; then LaTeX tables of the usable means and percentages.

Usage::

    python process_log.py LOG_OR_FOLDER [LOG_OR_FOLDER ...] [--model NAME]
                          [--csv PATH] [--latex PATH] [--fits_csv PATH]
                          [--norms 2,i] [-v]

A folder is searched (not recursively, as the original) for ``*.log`` and
``*.txt``; a file found there without ``[DEBUG][L1]`` lines is skipped with a
warning, a file named on the command line without any is an error (exit 2).

Model name of a log: ``--model NAME`` for every input; otherwise the
original's rule on the file name: the second ``_``-separated field, joined
with the third (up to its first ``.``) when the second is a dataset
(``mnist``, ``cifar``, and this toolkit's ``digits``): ``clever_mnist_normal.log``
is ``mnist_normal``, ``clever_inception.log`` is ``inception``; a name
without ``_`` gives its stem. Logs with the same model name are pooled (the
original overwrote one with the other).

Printed lines (stdout; a stable format, one per model, info and bound norm)::

    [L0] model = <model>, info = <info>, bnd_norm = <1|2|i>, Nimg = <int>, bnd_avg = <%.5g>, Nimg_usable = <int>, bnd_avg_usable = <%.5g>, usable_pct = <%.1f>

``Nimg`` counts the fits (lines), ``bnd_avg`` is the mean CLEVER score over
them, ``Nimg_usable``/``bnd_avg_usable`` the same over usable fits and
``usable_pct`` = 100 * Nimg_usable / Nimg. Every value parses with Python's
``float``; ``nan`` stands for "none" (``bnd_avg_usable`` with no usable fit)
and for "not applicable" (the three usable fields of ``--method maxsamp``
logs, whose lines carry no p-value). Scores are in the units of the input
images (distances), as clever.py prints them. The lines are followed by two
LaTeX tables (``%%% Table for bounds %%%``: usable means, 3 decimals;
``%%% Table for usable percentages %%%``: 1 decimal), one block per info,
one row per model, columns the norms of ``--norms`` (default ``2,i``, the
original's).

Differences from the original's script: this one also reads clever.py's
current lines (with ``nsamps``/``niters``, which the original's parser
rejected), maxsamp lines (ending at ``bnd``), and every info (class<j>);
it prints no argument dict or file list (diagnostics go to stderr with
``-v``), writes CSV instead of pickles, and its LaTeX rows end with ``\\\\``.
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd

import common
from common import ToolError

log = logging.getLogger("clever.process_log")

PROG = "process_log.py"

#: The original's filter of trustworthy fits (process_log.py: pVal > 0.05 & shape < 1000).
PVAL_MIN = 0.05
SHAPE_MAX = 1000.0

#: Datasets whose name is followed by the model type in a log's file name.
DATASETS = ("mnist", "cifar", "digits")

#: The original's row order of its LaTeX tables; other models follow in order of appearance.
MODEL_ORDER = ("mnist_2-layer", "mnist_normal", "mnist_distilled", "mnist_brelu",
               "cifar_2-layer", "cifar_normal", "cifar_distilled", "cifar_brelu",
               "inception", "resnet", "mobilenet")
INFO_ORDER = ("least", "random", "top2")
NORM_ORDER = ("1", "2", "i")

#: Columns of the per-fit table, in the order of clever.py's line. Integers are
#: identifiers; floats may be NaN where a line lacks the key (maxsamp, old logs).
INT_KEYS = ("id", "true_label", "target_label", "nsamps", "niters")
FLOAT_KEYS = ("bnd", "ks", "pVal", "shape", "loc", "scale", "g_x0")
STR_KEYS = ("info", "bnd_norm")
REQUIRED_KEYS = ("id", "info", "bnd_norm", "bnd")
FIT_COLUMNS = ("model", "source", "line", "id", "true_label", "target_label", "info",
               "nsamps", "niters", "bnd_norm", "bnd", "ks", "pVal", "shape", "loc",
               "scale", "g_x0")
SUMMARY_COLUMNS = ("model", "info", "bnd_norm", "n", "bnd_mean", "n_usable",
                   "bnd_mean_usable", "usable_pct")

_TAG = "[DEBUG][L1]"
# A number as Python, NumPy 1 or NumPy 2 may print it: 1.5, nan, [1.5], np.float32(1.5).
_WRAPPED = re.compile(r"^(?:np\.\w+\((.*)\)|\[\s*(.*?)\s*\])$")


class LineError(ValueError):
    """A ``[DEBUG][L1]`` line that cannot be read (the message says why)."""


# --------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------
def _number(text: str) -> float:
    m = _WRAPPED.match(text)
    if m:
        text = m.group(1) if m.group(1) is not None else m.group(2)
    return float(text)


def parse_debug_line(line: str) -> dict | None:
    """One clever.py line -> ``{key: value}``, or None when it is no ``[DEBUG][L1]`` line.

    The tag may follow a prefix (a timestamp added by a logger); keys are the
    ``key = value`` pairs after it, separated by commas. Known numeric keys
    become int/float, unknown keys are kept as strings. Raises
    :class:`LineError` for a tagged line that lacks a required key
    (id, info, bnd_norm, bnd) or has a value that is not a number.
    """
    pos = line.find(_TAG)
    if pos < 0:
        return None
    record: dict = {}
    for part in line[pos + len(_TAG):].strip().split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise LineError(f"{part.strip()!r} is not 'key = value'")
        try:
            if key in INT_KEYS:
                record[key] = int(value)
            elif key in FLOAT_KEYS:
                record[key] = _number(value)
            else:
                record[key] = value
        except ValueError:
            raise LineError(f"{key} = {value!r} is not a number") from None
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise LineError(f"no {', '.join(missing)}")
    return record


def parse_lines(lines: Iterable[str], model: str = "", source: str = "") -> pd.DataFrame:
    """Every ``[DEBUG][L1]`` line of ``lines`` -> a DataFrame with :data:`FIT_COLUMNS`.

    One row per fit (stage-1 file and bound norm); ``line`` is the 1-based
    line number; keys a line lacks are NaN (pVal, shape, ... for maxsamp).
    Other lines are ignored. Raises :class:`LineError` naming the line number.
    """
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            record = parse_debug_line(line)
        except LineError as err:
            raise LineError(f"line {number}: {err}") from None
        if record is not None:
            record.update(model=model, source=source, line=number)
            rows.append(record)
    df = pd.DataFrame(rows, columns=list(FIT_COLUMNS))
    for key in FLOAT_KEYS:
        df[key] = pd.to_numeric(df[key], errors="coerce").astype(float)
    for key in INT_KEYS:
        df[key] = df[key].astype("Int64")
    for key in STR_KEYS + ("model", "source"):
        df[key] = df[key].astype(object)
    return df


def model_name(path: str) -> str:
    """The model a log belongs to, from its file name, by the original's rule (module docstring)."""
    name = os.path.basename(path)
    fields = name.split("_")
    if len(fields) < 2:
        return os.path.splitext(name)[0]
    tag = fields[1].split(".")[0] if len(fields) == 2 else fields[1]
    if tag in DATASETS and len(fields) > 2:
        return f"{tag}_{fields[2].split('.')[0]}"
    return tag


# --------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSummary:
    """Statistics of the fits of one model, info and bound norm.

    ``n``: fits; ``bnd_mean``: mean CLEVER score over them (NaN scores
    skipped); ``n_usable``/``bnd_mean_usable``: over fits with pVal > 0.05 and
    shape < 1000; ``usable_pct``: 100 * n_usable / n. The usable fields are NaN
    when no fit of the group carries a p-value (method maxsamp).
    """
    model: str
    info: str
    bnd_norm: str
    n: int
    bnd_mean: float
    n_usable: float
    bnd_mean_usable: float
    usable_pct: float


def usable_mask(fits: pd.DataFrame) -> pd.Series:
    """True for fits the original trusts: pVal > 0.05 and shape < 1000 (NaN -> False)."""
    return (fits["pVal"] > PVAL_MIN) & (fits["shape"] < SHAPE_MAX)


def _order_key(value: str, preferred: Sequence[str]):
    if value in preferred:
        return (0, preferred.index(value), "", 0)
    m = re.match(r"^(.*?)(\d+)$", value)  # class2 before class10
    return (1, 0, m.group(1), int(m.group(2))) if m else (1, 0, value, -1)


def summarize(fits: pd.DataFrame) -> pd.DataFrame:
    """Per-fit table (:func:`parse_lines`) -> one row per model, info and norm.

    Columns :data:`SUMMARY_COLUMNS` (see :class:`GroupSummary`). Rows are
    ordered: models as the original's tables then by first appearance, infos
    least, random, top2 then the others (class<j> by j), norms 1, 2, i.
    """
    seen = list(dict.fromkeys(fits["model"]))
    models = sorted(seen, key=lambda m: (0, MODEL_ORDER.index(m)) if m in MODEL_ORDER
                    else (1, seen.index(m)))
    rows = []
    for model in models:
        of_model = fits[fits["model"] == model]
        infos = sorted(set(of_model["info"]), key=lambda v: _order_key(v, INFO_ORDER))
        for info in infos:
            of_info = of_model[of_model["info"] == info]
            norms = sorted(set(of_info["bnd_norm"]), key=lambda v: _order_key(v, NORM_ORDER))
            for norm in norms:
                group = of_info[of_info["bnd_norm"] == norm]
                n = len(group)
                if group["pVal"].notna().any():
                    usable = group[usable_mask(group)]
                    n_usable = float(len(usable))
                    mean_usable = float(usable["bnd"].mean()) if len(usable) else math.nan
                    pct = 100.0 * n_usable / n
                else:  # maxsamp: no fit, nothing to judge
                    n_usable = mean_usable = pct = math.nan
                rows.append(GroupSummary(model, info, norm, n, float(group["bnd"].mean()),
                                         n_usable, mean_usable, pct))
    return pd.DataFrame([r.__dict__ for r in rows], columns=list(SUMMARY_COLUMNS))


def _g(value: float, spec: str) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def summary_lines(summary: pd.DataFrame) -> list[str]:
    """The ``[L0]`` lines (format in the module docstring), one per summary row."""
    return [
        f"[L0] model = {r.model}, info = {r.info}, bnd_norm = {r.bnd_norm}, Nimg = {r.n}, "
        f"bnd_avg = {_g(r.bnd_mean, '.5g')}, Nimg_usable = {_g(r.n_usable, '.0f')}, "
        f"bnd_avg_usable = {_g(r.bnd_mean_usable, '.5g')}, usable_pct = {_g(r.usable_pct, '.1f')}"
        for r in summary.itertuples(index=False)]


def _latex_escape(text: str) -> str:
    return re.sub(r"([_&%$#{}])", r"\\\1", text)


def latex_tables(summary: pd.DataFrame, norms: Sequence[str] = ("2", "i")) -> str:
    """Two LaTeX ``tabular`` environments: usable mean scores and usable percentages.

    One block per info (a header row ``info & 2 & i``), one row per model;
    ``--`` where a model has no such value. Returns the text, ending in a newline.
    """
    index = {(r.model, r.info, r.bnd_norm): r for r in summary.itertuples(index=False)}
    models = list(dict.fromkeys(summary["model"]))
    infos = sorted(set(summary["info"]), key=lambda v: _order_key(v, INFO_ORDER))
    out = []
    for title, field, spec in (("bounds", "bnd_mean_usable", ".3f"),
                               ("usable percentages", "usable_pct", ".1f")):
        out.append(f"%%% Table for {title} %%%")
        out.append("\\begin{tabular}{l" + "r" * len(norms) + "}")
        out.append("\\hline")
        for info in infos:
            out.append(" & ".join([_latex_escape(info)] + list(norms)) + " \\\\")
            out.append("\\hline")
            for model in models:
                if not any((model, info, n) in index for n in norms):
                    continue
                cells = []
                for norm in norms:
                    r = index.get((model, info, norm))
                    value = getattr(r, field) if r is not None else math.nan
                    cells.append("--" if math.isnan(value) else format(value, spec))
                out.append(" & ".join([_latex_escape(model)] + cells) + " \\\\")
            out.append("\\hline")
        out.append("\\end{tabular}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def find_logs(paths: Sequence[str]) -> list[tuple[str, bool]]:
    """Inputs -> ``(file, named)``: folders give their ``*.log``/``*.txt`` (sorted, named=False)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(set(glob.glob(os.path.join(path, "*.log"))
                                + glob.glob(os.path.join(path, "*.txt"))))
            inside = [p for p in inside if os.path.isfile(p)]
            if not inside:
                raise ToolError(f"{path}: folder has no *.log or *.txt files")
            found.extend((p, False) for p in inside)
        elif os.path.isfile(path):
            found.append((path, True))
        else:
            raise ToolError(f"{path}: no such file or folder")
    # A log named twice (itself and through its folder) must not count twice.
    unique: dict[str, tuple[str, bool]] = {}
    for path, named in found:
        first = unique.setdefault(os.path.realpath(path), (path, named))
        unique[os.path.realpath(path)] = (first[0], first[1] or named)
    return list(unique.values())


def read_log(path: str, model: str) -> pd.DataFrame:
    """Parse one log file; a truncated last line (a run still writing) is skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as err:
        raise ToolError(f"{path}: cannot read ({err.strerror})") from None
    lines = text.splitlines()
    try:
        return parse_lines(lines, model=model, source=path)
    except LineError as err:
        if not text.endswith("\n") and str(err).startswith(f"line {len(lines)}:"):
            log.warning("%s: last line is incomplete, skipped (%s)", path, err)
            return parse_lines(lines[:-1], model=model, source=path)
        raise ToolError(f"{path}: {err}") from None


def _parse_norms(text: str) -> tuple[str, ...]:
    norms = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in norms if n not in NORM_ORDER]
    if not norms or bad:
        raise ToolError(f"--norms: expected a comma-separated list of 1, 2, i, got {text!r}")
    return norms


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Summarise clever.py logs: mean CLEVER scores per model, "
        "info and norm over all fits and over usable fits (pVal > 0.05, shape < 1000), "
        "and LaTeX tables.")
    parser.add_argument("logs", nargs="+", metavar="LOG",
                        help="clever.py log file(s) or folder(s) of *.log / *.txt")
    parser.add_argument("--model", default="",
                        help="model name for every input (default: from the file name)")
    parser.add_argument("--csv", default="", metavar="PATH",
                        help="write the per-group table as CSV")
    parser.add_argument("--latex", default="", metavar="PATH",
                        help="write the LaTeX tables")
    parser.add_argument("--fits_csv", default="", metavar="PATH",
                        help="write every parsed [DEBUG][L1] line as a CSV row")
    parser.add_argument("--norms", default="2,i",
                        help="norm columns of the LaTeX tables (default 2,i, the original's)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    args.norms = _parse_norms(args.norms)
    return args


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    tables = []
    for path, named in find_logs(args.logs):
        model = args.model or model_name(path)
        fits = read_log(path, model)
        if fits.empty:
            if named:
                raise ToolError(f"{path}: no [DEBUG][L1] lines (is it clever.py's output?)")
            log.warning("%s: no [DEBUG][L1] lines, skipped", path)
            continue
        log.info("%s: %d fits, model %s", path, len(fits), model)
        tables.append(fits)
    if not tables:
        raise ToolError(f"{', '.join(args.logs)}: no [DEBUG][L1] lines in any log")
    fits = pd.concat(tables, ignore_index=True)
    for model, group in fits.groupby("model", sort=False):
        has_p = group["pVal"].notna()
        if has_p.any() and not has_p.all():
            log.warning("model %s pools lines with and without pVal (maxsamp and fitted logs): "
                        "its usable figures count the maxsamp lines as not usable", model)

    summary = summarize(fits)
    latex = latex_tables(summary, args.norms)
    for line in summary_lines(summary):
        print(line)
    print()
    print(latex, end="")
    if args.csv:
        common.atomic_write_text(args.csv, summary.to_csv(index=False, na_rep="nan"))
    if args.latex:
        common.atomic_write_text(args.latex, latex)
    if args.fits_csv:
        common.atomic_write_text(args.fits_csv, fits.to_csv(index=False, na_rep="nan"))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog=PROG))
