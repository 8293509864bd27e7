"""process_log.py: parsing clever.py logs (the original's and this toolkit's) and the summaries.

Known answers are computed here from the log text with regular expressions,
independently of process_log's parser; the original tool's own [STATS][L0]
lines in the fixtures give a second, external check of the means.
"""
import csv
import math
import os
import re
import subprocess
import sys

import pytest

import process_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the original tool's logs and the stage-1 files they came from (README.md there)
FIXTURES = os.path.join(ROOT, "tests", "data", "original-stage2")
PYTHON = sys.executable


def _fixture(name):
    return os.path.join(FIXTURES, name)


def _read(path):
    with open(path) as fh:
        return fh.read()


def _selected(text, info, norm):
    """(bnd, pVal, shape) of the lines of one info and norm, by regex on the raw text."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"\[DEBUG\]\[L1\] .*info = {info}, .*bnd_norm = {norm}, bnd = ([^,\s]+)"
                     r"(?:, ks = [^,]+, pVal = ([^,]+), shape = ([^,]+))?", line)
        if m:
            out.append((float(m.group(1)),
                        float(m.group(2)) if m.group(2) else math.nan,
                        float(m.group(3)) if m.group(3) else math.nan))
    return out


def _row(summary, model, info, norm):
    rows = summary[(summary.model == model) & (summary["info"] == info)
                   & (summary.bnd_norm == norm)]
    assert len(rows) == 1, (model, info, norm)
    return rows.iloc[0]


# --------------------------------------------------------------------------
# The original's logs
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["original_targeted_mle_reg.txt", "original_targeted_mle.txt",
                                  "original_targeted_maxsamp.txt",
                                  "original_untargeted_mle_reg.txt"])
def test_every_debug_line_of_the_original_is_parsed(name):
    text = _read(_fixture(name))
    fits = process_log.parse_lines(text.splitlines(), model="m", source=name)
    tagged = [line for line in text.splitlines() if line.startswith("[DEBUG][L1]")]
    assert len(fits) == len(tagged) > 0
    # g_x0 printed with all its digits (repr of a float32 widened) is read exactly.
    for (_, fit), line in zip(fits.iterrows(), tagged):
        m = re.search(r"g_x0 = (\S+)$", line)
        if m:
            assert fit.g_x0 == float(m.group(1))
        assert fit.bnd == float(re.search(r"bnd = ([^,\s]+)", line).group(1))
        assert fit.nsamps == int(re.search(r"nsamps = (\d+)", line).group(1))


@pytest.mark.parametrize("info", ["top2", "random", "least"])
@pytest.mark.parametrize("norm,label", [("1", "L1"), ("2", "L2"), ("i", "Li")])
def test_means_of_the_original_mle_reg_log(info, norm, label):
    path = _fixture("original_targeted_mle_reg.txt")
    text = _read(path)
    selected = _selected(text, info, norm)
    assert len(selected) == 3  # 3 correctly classified images
    expected_mean = sum(b for b, _, _ in selected) / len(selected)
    usable = [b for b, p, s in selected if p > 0.05 and s < 1000]

    summary = process_log.summarize(process_log.parse_lines(text.splitlines(), model="cnn"))
    row = _row(summary, "cnn", info, norm)
    assert row.n == len(selected)
    assert row.bnd_mean == pytest.approx(expected_mean, rel=1e-12)
    assert row.n_usable == len(usable)
    assert row.usable_pct == pytest.approx(100.0 * len(usable) / len(selected))
    assert row.bnd_mean_usable == pytest.approx(sum(usable) / len(usable), rel=1e-12)
    # The original's own summary line: the mean of the unrounded scores, printed with
    # 5 digits; the lines' scores are rounded to 5 digits too, so allow that rounding.
    stats = re.search(rf"\[STATS\]\[L0\] info = {info}, .*{info}_clever_{label} = ([^,\s]+)", text)
    assert row.bnd_mean == pytest.approx(float(stats.group(1)), rel=1.5e-4)


def test_maxsamp_log_has_no_usable_figures():
    text = _read(_fixture("original_targeted_maxsamp.txt"))
    fits = process_log.parse_lines(text.splitlines(), model="cnn")
    assert fits["pVal"].isna().all() and fits["shape"].isna().all()
    summary = process_log.summarize(fits)
    selected = _selected(text, "top2", "2")
    row = _row(summary, "cnn", "top2", "2")
    assert row.n == len(selected) == 3
    assert row.bnd_mean == pytest.approx(sum(b for b, _, _ in selected) / 3, rel=1e-12)
    assert math.isnan(row.n_usable) and math.isnan(row.bnd_mean_usable)
    assert math.isnan(row.usable_pct)
    line = [ln for ln in process_log.summary_lines(summary) if "info = top2, bnd_norm = 2," in ln][0]
    assert "Nimg_usable = nan, bnd_avg_usable = nan, usable_pct = nan" in line


def test_untargeted_log_orders_classes_numerically():
    text = _read(_fixture("original_untargeted_mle_reg.txt"))
    summary = process_log.summarize(process_log.parse_lines(text.splitlines(), model="u"))
    infos = list(dict.fromkeys(summary["info"]))
    assert infos == sorted(set(re.findall(r"info = (class\d+)", text)),
                           key=lambda s: int(s[5:]))
    assert summary.n.sum() == text.count("[DEBUG][L1]")


# --------------------------------------------------------------------------
# Synthetic logs: the usable filter, formats, files
# --------------------------------------------------------------------------
def _line(bnd, pval, shape, norm="2", info="top2", img=1, extra=True):
    head = f"[DEBUG][L1] id = {img}, true_label = 3, target_label = 5, info = {info}, "
    if extra:  # this toolkit's and the later original's lines; older ones lack these
        head += "nsamps = 128, niters = 40, "
    return (head + f"bnd_norm = {norm}, bnd = {bnd}, ks = 0.05, pVal = {pval}, "
            f"shape = {shape}, loc = -1.5, scale = 0.2, g_x0 = 3.1415926535897931")


SYNTHETIC = "\n".join([
    "loading x.mat",
    _line(1.0, 0.5, 10.0, img=1),
    "[DEBUG][L2] c_init =   0.1, fitted c =  10.00, loc =   -1.50",
    _line(2.0, 0.01, 10.0, img=2),               # p-value too low: not usable
    _line(3.0, 0.5, 2000.0, img=3, extra=False),  # shape too large: not usable
    _line(6.0, 0.9, 999.0, img=4),
    _line(0.25, 0.9, 5.0, norm="1", img=4),
    "[STATS][L0] info = top2, top2_clever_L2 = 3",
]) + "\n"


def test_usable_filter_excludes_low_pvalue_and_large_shape():
    fits = process_log.parse_lines(SYNTHETIC.splitlines(), model="m")
    assert len(fits) == 5
    assert fits.g_x0.iloc[0] == 3.1415926535897931
    assert fits.nsamps.isna().sum() == 1  # the line without nsamps/niters
    row = _row(process_log.summarize(fits), "m", "top2", "2")
    assert row.n == 4
    assert row.bnd_mean == pytest.approx((1 + 2 + 3 + 6) / 4)
    assert row.n_usable == 2
    assert row.bnd_mean_usable == pytest.approx((1 + 6) / 2)
    assert row.usable_pct == pytest.approx(50.0)


def test_model_name_from_file_name():
    assert process_log.model_name("logs/clever_mnist_normal.log") == "mnist_normal"
    assert process_log.model_name("clever_cifar_2-layer_relu.txt") == "cifar_2-layer"
    assert process_log.model_name("x/clever_digits_cnn.log") == "digits_cnn"
    assert process_log.model_name("clever_inception.log") == "inception"
    assert process_log.model_name("log_resnet_v2.log") == "resnet"
    assert process_log.model_name("mylog.txt") == "mylog"


def test_csv_and_latex_written(tmp_path, capsys):
    log = tmp_path / "clever_mnist_normal.log"
    log.write_text(SYNTHETIC)
    csv_path, tex_path = tmp_path / "out" / "s.csv", tmp_path / "s.tex"
    fits_path = tmp_path / "fits.csv"
    args = process_log.parse_args([str(tmp_path), "--csv", str(csv_path), "--latex",
                                   str(tex_path), "--fits_csv", str(fits_path)])
    assert process_log.main(args) == 0
    out = capsys.readouterr().out
    assert ("[L0] model = mnist_normal, info = top2, bnd_norm = 2, Nimg = 4, bnd_avg = 3, "
            "Nimg_usable = 2, bnd_avg_usable = 3.5, usable_pct = 50.0") in out.splitlines()

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["info"], r["bnd_norm"]) for r in rows] == [("top2", "1"), ("top2", "2")]
    assert rows[1]["model"] == "mnist_normal"
    assert float(rows[1]["bnd_mean"]) == pytest.approx(3.0)
    assert float(rows[1]["bnd_mean_usable"]) == pytest.approx(3.5)
    assert float(rows[1]["usable_pct"]) == pytest.approx(50.0)
    with open(fits_path) as fh:
        assert len(list(csv.DictReader(fh))) == 5

    tex = tex_path.read_text()
    assert tex.count("\\begin{tabular}{lrr}") == 2 and tex.count("\\end{tabular}") == 2
    # Norm i has no fit: "--"; the model's underscore is escaped for LaTeX.
    assert "mnist\\_normal & 3.500 & -- \\\\" in tex
    assert "mnist\\_normal & 50.0 & -- \\\\" in tex
    assert tex in out  # the same tables were printed
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_model_option_and_pooling(tmp_path, capsys):
    a, b = tmp_path / "a.log", tmp_path / "b.txt"
    a.write_text(_line(1.0, 0.5, 10.0) + "\n")
    b.write_text(_line(2.0, 0.5, 10.0) + "\n")
    (tmp_path / "notes.txt").write_text("no debug lines here\n")  # skipped inside a folder
    assert process_log.main(process_log.parse_args([str(tmp_path), str(a), "--model", "net"])) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[L0]")]
    # a.log named twice counts once; both logs pool under --model.
    assert lines == ["[L0] model = net, info = top2, bnd_norm = 2, Nimg = 2, bnd_avg = 1.5, "
                     "Nimg_usable = 2, bnd_avg_usable = 1.5, usable_pct = 100.0"]


def test_bad_value_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.log"
    bad.write_text(_line(1.0, 0.5, 10.0) + "\n" + _line("oops", 0.5, 10.0) + "\n")
    with pytest.raises(process_log.ToolError, match=r"bad\.log: line 2: bnd = 'oops'"):
        process_log.main(process_log.parse_args([str(bad)]))


def test_truncated_last_line_is_skipped(tmp_path, capsys):
    log = tmp_path / "running.log"
    log.write_text(_line(1.0, 0.5, 10.0) + "\n[DEBUG][L1] id = 2, true_label = 3, targ")
    assert process_log.main(process_log.parse_args([str(log)])) == 0
    assert "Nimg = 1, bnd_avg = 1," in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--norms", "2,x"], []])
def test_bad_arguments(tmp_path, argv, capsys):
    missing = str(tmp_path / "nope.log")
    status = process_log.common.run_cli(process_log.main, process_log.parse_args,
                                        [missing] + argv, prog="process_log.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert ("--norms" in err[0]) if argv else (missing in err[0])


# --------------------------------------------------------------------------
# The command line, as users run it
# --------------------------------------------------------------------------
def _cli(*argv):
    return subprocess.run([PYTHON, os.path.join(ROOT, "process_log.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_no_debug_lines_one_line_error(tmp_path):
    empty = tmp_path / "stage1.log"
    empty.write_text("[STATS][L1] total = 3, seq = 0\nnothing else\n")
    proc = _cli(str(empty))
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "Traceback" not in proc.stderr


def test_cli_on_the_original_log():
    path = _fixture("original_targeted_mle_reg.txt")
    proc = _cli(path)
    assert proc.returncode == 0, proc.stderr
    selected = _selected(_read(path), "top2", "2")
    line = re.search(r"^\[L0\] model = targeted, info = top2, bnd_norm = 2, Nimg = (\d+), "
                     r"bnd_avg = (\S+), Nimg_usable = (\d+), bnd_avg_usable = (\S+), "
                     r"usable_pct = (\S+)$", proc.stdout, re.M)
    assert line, proc.stdout
    assert int(line.group(1)) == len(selected)
    assert float(line.group(2)) == pytest.approx(sum(b for b, _, _ in selected) / 3, rel=1e-4)
    assert float(line.group(5)) == pytest.approx(
        100.0 * sum(p > 0.05 and s < 1000 for _, p, s in selected) / len(selected), abs=0.05)
    assert "%%% Table for bounds %%%" in proc.stdout


def test_this_toolkits_clever_log(tmp_path):
    """This toolkit's clever.py output: process_log's means equal its own [STATS][L0] lines."""
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "clever.py"),
                           os.path.join(FIXTURES, "targeted"), "--method", "maxsamp",
                           "--nthreads", "1"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "clever_digits_cnn.log"
    log.write_text(proc.stdout)
    fits = process_log.read_log(str(log), process_log.model_name(str(log)))
    assert len(fits) == proc.stdout.count("[DEBUG][L1]") > 0
    summary = process_log.summarize(fits)
    stats = [m for line in proc.stdout.splitlines() if line.startswith("[STATS][L0]")
             for m in re.findall(r"(\w+)_clever_(L1|L2|Li) = ([^,\s]+)", line)]
    assert len(stats) == 9  # top2, random, least x 3 norms
    for info, label, value in stats:
        row = _row(summary, "digits_cnn", info, {"L1": "1", "L2": "2", "Li": "i"}[label])
        assert row.bnd_mean == pytest.approx(float(value), rel=1.5e-4)
