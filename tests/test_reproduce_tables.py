"""reproduce_tables.py: the whole pipeline on two tiny models, the tables against their records.

The pipeline runs once (and once more to check reuse) with tiny settings on
two small Keras MLPs trained here for a few seconds; the tables' numbers are
recomputed below from the stage-2 JSON summaries and the attack caches the
run points to, with code independent of the module's.
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import paper_tables as pt
import reproduce_tables as rt
from common import ToolError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mlp_tanh", "mlp_softplus")
NUMIMG, NSAMPS, NITERS, CW_ITERS = 3, 16, 12, 30
#: Neither stage 1's default (3) nor the tables' (5), so the test sees the flag arrive.
RADIUS = 4.0
KINDS = ("least", "random", "top2")


def _train_tiny(path, activation, units, seed):
    import keras

    import models

    keras.utils.set_random_seed(seed)
    data = models.load_dataset("digits")
    inp = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(units, activation=activation)(keras.layers.Flatten()(inp))
    model = keras.Model(inp, keras.layers.Dense(10)(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.003),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(data.train_data, data.train_labels, epochs=8, batch_size=64, verbose=0)
    model.save(str(path))


def _argv(base, *extra):
    return ["--dataset", "digits", "--models", ",".join(MODELS),
            "--models_dir", str(base / "models"), "--data_dir", str(base / "data"),
            "--numimg", str(NUMIMG), "-N", str(NSAMPS), "-i", str(NITERS),
            "--radius", str(RADIUS), "--cw_iterations", str(CW_ITERS), "--cw_binary_steps", "2",
            "--ifgsm_iterations", "5", "--out", str(base / "out"), "--save", str(base / "save"),
            "--nthreads", "2", "--no_progress", *extra]


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = rt.main(rt.parse_args(argv))
    return status, buf.getvalue()


def _stats_lines(out):
    logs = os.path.join(out, "logs")
    return {name: sum(line.startswith("[STATS][L1]") for line in open(os.path.join(logs, name)))
            for name in sorted(os.listdir(logs)) if name.startswith("stage1_")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the pipeline twice; keep what the first run wrote before the second overwrites it."""
    base = tmp_path_factory.mktemp("tables")
    (base / "models").mkdir()
    _train_tiny(base / "models" / "mlp_tanh.keras", "tanh", 16, 1)
    _train_tiny(base / "models" / "mlp_softplus.keras", "softplus", 12, 2)
    out = str(base / "out")
    status, stdout = _run(_argv(base))
    first = {
        "status": status, "stdout": stdout, "stats": _stats_lines(out),
        "run": json.load(open(os.path.join(out, "run.json"))),
        "csv": {n: open(os.path.join(out, n)).read() for n in os.listdir(out)
                if n.endswith(".csv")},
    }
    status2, stdout2 = _run(_argv(base))
    second = {"status": status2, "stdout": stdout2, "stats": _stats_lines(out),
              "run": json.load(open(os.path.join(out, "run.json")))}
    return {"base": base, "out": out, "first": first, "second": second}


# --------------------------------------------------------------------------
# Independent recomputation from the files the run points to
# --------------------------------------------------------------------------
def _summary(run, model, mode):
    return json.load(open(run["models"][model][mode]["summary"]))["records"]


def _attack_records(run, model):
    out = {}
    for attack, path in run["models"][model]["attack_caches"].items():
        data = json.load(open(path))
        assert data["attack"] == attack and data["model"] == model
        out.update({(r["attack"], r["id"], r["target"]): r for r in data["records"]})
    return out


def _distortion(rec, key):
    return rec[key] if rec["success"] else math.inf


def _mean_of_finite(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _expected_rows(run, model):
    """(kind, id, target, clever L2, clever Li) from the summaries, ids of this run only."""
    ids = set(run["image_ids"])
    rows = []
    for rec in _summary(run, model, "targeted"):
        if rec["id"] in ids and rec["info"] in KINDS:
            rows.append((rec["info"], rec["id"], rec["target_label"],
                         rec["norms"]["L2"]["bound"], rec["norms"]["Li"]["bound"]))
    per_image = {}
    for rec in _summary(run, model, "untargeted"):
        if rec["id"] in ids:
            per_image.setdefault(rec["id"], []).append(rec)
    for img, recs in per_image.items():
        assert len(recs) == 9 and all(r["info"].startswith("class") for r in recs)
        rows.append(("untargeted", img, -1, min(r["norms"]["L2"]["bound"] for r in recs),
                     min(r["norms"]["Li"]["bound"] for r in recs)))
    return rows


def _close(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------
def test_outputs_exist_with_expected_columns_and_rows(pipeline):
    out, run = pipeline["out"], pipeline["first"]["run"]
    assert pipeline["first"]["status"] == 0
    for name in ("tables.md", "figure6.png", "run.json", "records.csv", "fits.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    t2 = pd.read_csv(os.path.join(out, "table2_untargeted.csv"))
    assert list(t2.columns) == ["model", "source", "images", "CW L2", "CW Linf", "I-FGSM L2",
                                "I-FGSM Linf", "CLEVER L2", "CLEVER Linf"]
    # Tiny models have no paper row: only ours, one per model, in the order given.
    assert list(t2["model"]) == list(MODELS) and set(t2["source"]) == {"ours"}
    t3 = pd.read_csv(os.path.join(out, "table3_targeted_l2.csv"))
    assert list(t3.columns) == ["model", "source", "pairs", "least CW", "least CLEVER",
                                "random CW", "random CLEVER", "top-2 CW", "top-2 CLEVER"]
    t4 = pd.read_csv(os.path.join(out, "table4_clever_exceeds.csv"))
    assert list(t4.columns) == ["model", "target", "n", "CW L2", "I-FGSM L2", "CW Linf",
                                "I-FGSM Linf"]
    assert [tuple(r) for r in t4[["model", "target"]].values] == [
        (m, k) for m in MODELS for k in ("least", "random", "top-2", "untargeted")]
    t5 = pd.read_csv(os.path.join(out, "table5_ks.csv"))
    assert list(t5["model"]) == list(MODELS)
    assert "all fits" in t5.columns and "fallbacks" in t5.columns
    # Every image examined is one the run names, and each model kept at least one.
    assert run["image_ids"] == list(range(NUMIMG))
    assert (t2["images"] >= 1).all() and (t2["images"] <= NUMIMG).all()


def test_table_numbers_equal_the_records(pipeline):
    out, run = pipeline["out"], pipeline["first"]["run"]
    t2 = pd.read_csv(os.path.join(out, "table2_untargeted.csv")).set_index("model")
    t3 = pd.read_csv(os.path.join(out, "table3_targeted_l2.csv")).set_index("model")
    t4 = pd.read_csv(os.path.join(out, "table4_clever_exceeds.csv"))
    for model in MODELS:
        rows = _expected_rows(run, model)
        attacks = _attack_records(run, model)
        unt = [r for r in rows if r[0] == "untargeted"]
        assert t2.loc[model, "images"] == len(unt)
        expect2 = {
            "CW L2": [_distortion(attacks[("cw_l2", i, -1)], "l2") for _, i, *_ in unt],
            "CW Linf": [_distortion(attacks[("cw_l2", i, -1)], "linf") for _, i, *_ in unt],
            "I-FGSM L2": [_distortion(attacks[("ifgsm_l2", i, -1)], "l2") for _, i, *_ in unt],
            "I-FGSM Linf": [_distortion(attacks[("ifgsm_li", i, -1)], "linf")
                            for _, i, *_ in unt],
            "CLEVER L2": [r[3] for r in unt], "CLEVER Linf": [r[4] for r in unt]}
        for col, values in expect2.items():
            assert _close(float(t2.loc[model, col]), _mean_of_finite(values)), (model, col)
        for kind, label in zip(KINDS, ("least", "random", "top-2")):
            part = [r for r in rows if r[0] == kind]
            cw = [_distortion(attacks[("cw_l2", i, t)], "l2") for _, i, t, *_ in part]
            assert _close(float(t3.loc[model, f"{label} CW"]), _mean_of_finite(cw))
            assert _close(float(t3.loc[model, f"{label} CLEVER"]),
                          _mean_of_finite([r[3] for r in part]))
            row = t4[(t4["model"] == model) & (t4["target"] == label)].iloc[0]
            assert row["n"] == len(part)
            exceed = sum(r[3] > c for r, c in zip(part, cw))
            assert _close(float(row["CW L2"]), 100.0 * exceed / len(part))
            li = [_distortion(attacks[("ifgsm_li", i, t)], "linf") for _, i, t, *_ in part]
            exceed = sum(r[4] > d for r, d in zip(part, li))
            assert _close(float(row["I-FGSM Linf"]), 100.0 * exceed / len(part))
        row = t4[(t4["model"] == model) & (t4["target"] == "untargeted")].iloc[0]
        exceed = sum(r[3] > c for r, c in zip(unt, expect2["CW L2"]))
        assert _close(float(row["CW L2"]), 100.0 * exceed / len(unt))


def test_table5_counts_the_ks_test_of_every_fit(pipeline):
    out, run = pipeline["out"], pipeline["first"]["run"]
    t5 = pd.read_csv(os.path.join(out, "table5_ks.csv")).set_index("model")
    ids = set(run["image_ids"])
    for model in MODELS:
        fits = [(mode, norm, fit) for mode in ("targeted", "untargeted")
                for rec in _summary(run, model, mode) if rec["id"] in ids
                for norm, fit in rec["norms"].items()]
        passed = [f["status"] == "fit" and f["pval"] is not None and f["pval"] > 0.05
                  for _, _, f in fits]
        assert t5.loc[model, "fits"] == len(fits)
        assert _close(float(t5.loc[model, "all fits"]), 100.0 * sum(passed) / len(fits))
        sub = [p for (mode, norm, _), p in zip(fits, passed) if mode == "targeted" and norm == "L2"]
        assert _close(float(t5.loc[model, "targeted L2"]), 100.0 * sum(sub) / len(sub))
        assert t5.loc[model, "fallbacks"] == sum(f["fallback"] for _, _, f in fits)


def test_table4_percentages_are_percentages(pipeline):
    t4 = pd.read_csv(os.path.join(pipeline["out"], "table4_clever_exceeds.csv"))
    values = t4[["CW L2", "I-FGSM L2", "CW Linf", "I-FGSM Linf"]].to_numpy(float)
    assert np.all((values >= 0) & (values <= 100))
    t5 = pd.read_csv(os.path.join(pipeline["out"], "table5_ks.csv"))
    assert np.all((t5["all fits"] >= 0) & (t5["all fits"] <= 100))


def test_markdown_records_settings_versions_and_is_printed(pipeline):
    md = open(os.path.join(pipeline["out"], "tables.md")).read()
    # tables.md is the rerun's; both runs print their Markdown (and nothing else) on stdout.
    assert pipeline["second"]["stdout"].strip() == md.strip()
    assert pipeline["first"]["stdout"].startswith("# CLEVER scores and attack distortions")
    for needle in ("| N_s (samples per batch) | 16 |", "| N_b (batches) | 12 |",
                   "| seed | 1215 |", f"{CW_ITERS} iterations, 2 binary search steps",
                   "| sample norm | l2 |", f"| radius R | {RADIUS} |", "0.01, 0.025, 0.05, 0.1",
                   f"{NUMIMG} test images", "| tensorflow |", "| keras |", "| numpy |",
                   "Produced by `python reproduce_tables.py", "## Table 2", "## Table 3",
                   "## Table 4", "## Table 5", "## Acceptance checks"):
        assert needle in md, needle
    # The paper's published numbers are quoted for reference.
    assert "93-100%" in md


def test_radius_reaches_stage1_and_names_its_folder(pipeline):
    run = pipeline["first"]["run"]
    for model in MODELS:
        for mode in ("targeted", "untargeted"):
            recs = _summary(run, model, mode)
            assert recs and all(r["radius"] == RADIUS for r in recs)
            # The L2 bound is capped at the radius the samples were drawn in.
            assert all(r["norms"]["L2"]["cap"] == RADIUS for r in recs)
        assert f"_R{RADIUS:g}_" in run["models"][model]["stage1_root"]
    assert f"--radius {RADIUS:g}" in open(os.path.join(pipeline["out"], "tables.md")).read()


def test_tables_default_to_the_paper_radius_and_keep_radii_apart():
    args = rt.parse_args([])
    assert args.radius == 5.0
    roots = {rt.stage1_root("s", "digits", "normal", "ab" * 32, rt.parse_args(["-R", r]))
             for r in ("3", "5", "5.0")}
    assert len(roots) == 2


def test_paper_rows_sit_next_to_ours_for_named_models():
    rows = [{"model": "normal", "kind": "untargeted", "id": 0, "target": -1,
             "clever_L2": 0.5, "clever_Li": 0.02, "cw_l2_L2": 1.0, "cw_l2_Li": 0.2,
             "ifgsm_l2_L2": 2.0, "ifgsm_li_Li": 0.1}]
    t2 = pt.table2(rows, pt.PAPER_TABLE2["mnist"])
    assert list(t2["source"]) == ["ours", "paper MNIST-CNN"]
    assert t2.iloc[1]["CW L2"] == 1.500 and t2.iloc[1]["CLEVER Linf"] == 0.057
    assert t2.iloc[0]["CW L2"] == 1.0 and t2.iloc[0]["I-FGSM L2"] == 2.0


def test_figure_is_a_valid_png(pipeline):
    from PIL import Image

    path = os.path.join(pipeline["out"], "figure6.png")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


def test_rerun_reuses_stage1_stage2_and_attacks(pipeline):
    first, second = pipeline["first"], pipeline["second"]
    assert second["status"] == 0
    # First run: one [STATS][L1] line per stage-1 file written; rerun: none.
    assert sum(first["stats"].values()) > 0
    assert set(second["stats"]) == set(first["stats"]) and sum(second["stats"].values()) == 0
    for model in MODELS:
        info1, info2 = first["run"]["models"][model], second["run"]["models"][model]
        assert info1["attacks_computed"] > 0 and info1["attacks_reused"] == 0
        assert info2["attacks_computed"] == 0
        assert info2["attacks_reused"] == info1["attacks_computed"]
        for mode in ("targeted", "untargeted"):
            assert info1[mode]["stage2_ran"] and not info2[mode]["stage2_ran"]
            assert info2[mode]["new_stage1_files"] == 0
    for name, text in first["csv"].items():
        assert open(os.path.join(pipeline["out"], name)).read() == text, name


def test_more_images_compute_only_the_new_image(pipeline, tmp_path):
    import shutil

    base, out, save = pipeline["base"], str(tmp_path / "out"), str(tmp_path / "save")
    # Copies, so the first run's files stay as the other tests read them.
    shutil.copytree(os.path.join(pipeline["out"], "cache"), os.path.join(out, "cache"))
    shutil.copytree(base / "save", save)
    argv = _argv(base, "--out", out, "--save", save)
    argv[argv.index("--numimg") + 1] = str(NUMIMG + 1)
    status, _ = _run(argv)
    assert status == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["image_ids"] == list(range(NUMIMG + 1))
    for model in MODELS:
        info, before = run["models"][model], pipeline["first"]["run"]["models"][model]
        # Image NUMIMG is new: 3 targeted and 9 class files if the model classifies it right.
        new_images = info["untargeted"]["new_stage1_files"] // 9
        assert new_images in (0, 1)
        assert info["targeted"]["new_stage1_files"] == 3 * new_images
        assert info["untargeted"]["new_stage1_files"] == 9 * new_images
        assert info["targeted"]["stage2_ran"] == bool(new_images)
        # Three attacks on each new (image, target) and on the new image untargeted.
        assert info["attacks_computed"] == 3 * (3 + 1) * new_images
        assert info["attacks_reused"] == before["attacks_computed"]


# --------------------------------------------------------------------------
# Pure functions on synthetic records
# --------------------------------------------------------------------------
def _summary_record(img, info, target, l2, li, pval=0.5, status="fit"):
    norms = {label: {"bound": value, "pval": pval, "status": status,
                     "fallback": status not in ("fit", "maxsamp")}
             for label, value in (("L1", 10 * l2), ("L2", l2), ("Li", li))}
    return {"id": img, "true_label": 1, "target_label": target, "info": info, "norms": norms}


def test_clever_rows_take_the_minimum_over_classes_and_filter_ids():
    recs = [_summary_record(0, f"class{j}", j, 1.0 + j, 0.1 + j) for j in (0, 2, 3)]
    recs += [_summary_record(5, "class2", 2, 9.0, 9.0),
             _summary_record(0, "top2", 7, 0.4, 0.03), _summary_record(5, "least", 4, 2.0, 0.1)]
    unt = pt.clever_rows(recs, "m", ids=[0], untargeted=True)
    assert len(unt) == 1 and unt[0]["clever_L2"] == 1.0 and unt[0]["clever_Li"] == 0.1
    # three class files and the true class
    assert unt[0]["n_classes"] == 4 and unt[0]["target"] == -1
    tgt = pt.clever_rows(recs, "m", ids=[0, 5])
    assert [(r["id"], r["kind"], r["target"]) for r in tgt] == [(0, "top2", 7), (5, "least", 4)]


def test_failed_attacks_are_left_out_of_means_and_never_exceeded():
    rows = [{"model": "m", "kind": "top2", "id": i, "target": 3, "clever_L2": c,
             "clever_Li": 0.01, "cw_l2_L2": d, "cw_l2_Li": 0.1, "ifgsm_l2_L2": d,
             "ifgsm_li_Li": 0.5, "cw_l2_success": math.isfinite(d),
             "ifgsm_l2_success": True, "ifgsm_li_success": True}
            for i, (c, d) in enumerate([(0.5, 1.0), (2.0, 1.0), (5.0, math.inf), (0.1, 3.0)])]
    t3 = pt.table3(rows)
    assert t3.iloc[0]["top-2 CW"] == pytest.approx((1.0 + 1.0 + 3.0) / 3)
    assert t3.iloc[0]["top-2 CLEVER"] == pytest.approx((0.5 + 2.0 + 5.0 + 0.1) / 4)
    t4 = pt.table4(rows)
    assert t4.iloc[0]["CW L2"] == pytest.approx(25.0)  # only (2.0 > 1.0); inf is never beaten
    assert pt.success_table(rows).iloc[0]["CW"] == pytest.approx(75.0)
    acc = {(a["scope"], a["check"][:6]): a for a in pt.acceptance(rows, [
        {"model": "m", "ks_pass": p} for p in (True, True, False)])}
    assert acc[("m", "CLEVER")]["value"] == pytest.approx(75.0)
    assert not acc[("m", "CLEVER")]["passed"]
    assert acc[("all models", "K-S p ")]["value"] == pytest.approx(200 / 3)


def test_merge_attacks_turns_failures_into_inf_and_requires_every_result():
    rows = [{"model": "m", "kind": "untargeted", "id": 4, "target": -1}]
    results = {pt.attack_key(a, 4, -1): {"success": a is not pt.Attack.CW_L2, "l2": 0.3,
                                         "linf": 0.05} for a in pt.Attack}
    merged = pt.merge_attacks(rows, results)[0]
    assert merged["cw_l2_L2"] == math.inf and merged["ifgsm_l2_L2"] == 0.3
    del results[pt.attack_key(pt.Attack.IFGSM_L2, 4, -1)]
    with pytest.raises(ToolError, match="ifgsm_l2"):
        pt.merge_attacks(rows, results)


def test_attack_cache_keys_follow_each_attacks_settings_and_the_model():
    base = dict(cw_iterations=2000, cw_binary_steps=9, cw_learning_rate=0.01,
                cw_initial_const=1e-3, cw_confidence=0.0, ifgsm_iterations=50,
                linf_eps=(0.01, 0.1), l2_eps=(0.5,), ifgsm_losses=("xent",))
    cw, li, l2 = pt.Attack.CW_L2, pt.Attack.IFGSM_LINF, pt.Attack.IFGSM_L2

    def key(attack, model="normal", digest="abc", **change):
        return rt.AttackSettings(**{**base, **change}).key(attack, "digits", model, digest)

    assert key(cw) == key(cw) and len({key(cw), key(li), key(l2)}) == 3
    assert key(cw) != key(cw, cw_iterations=1000) and key(li) == key(li, cw_iterations=1000)
    # An I-FGSM change leaves CW's results valid, and the L-inf grid leaves the L2 variant's.
    assert key(cw) == key(cw, ifgsm_losses=("xent", "margin"))
    assert key(li) != key(li, linf_eps=(0.01,)) and key(l2) == key(l2, linf_eps=(0.01,))
    assert key(cw) != key(cw, digest="abd") and key(cw) != key(cw, model="brelu")


def test_markdown_table_formats_numbers_and_missing_values():
    df = pd.DataFrame({"model": ["a|b"], "x": [1.23456], "y": [math.nan], "z": [math.inf]})
    text = pt.markdown_table(df, formats={"x": ".2f"})
    assert text.splitlines() == ["| model | x | y | z |", "|:---|---:|---:|---:|",
                                 "| a\\|b | 1.23 | - | inf |"]


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--numimg", "0"], "--numimg"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--models", ","], "--models"),
    (["--models", "normal,normal"], "twice"),
    (["--Niters", "2"], "--Niters"),
    (["--radius", "0"], "--radius"),
    (["--cw_iterations", "-5"], "--cw_iterations"),
    (["--Nsamps", "ten"], "--Nsamps"),
    (["--bogus"], "--bogus"),
    (["--address", "nohost"], "--address"),
    (["--workers", "-1"], "--workers"),
])
def test_bad_flags_give_one_line_errors(argv, needle):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce_tables.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reproduce_tables.py: error:"), proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unknown_model_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce_tables.py"),
                           "--models", "normal,nosuch", "--models_dir", str(tmp_path),
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"reproduce_tables.py: error: --models: unknown model 'nosuch'; use "
                         f"normal, distilled, brelu, 2-layer or the stem of a file in "
                         f"{tmp_path}/")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_address_runs_stage1_and_attacks_on_ray_with_the_same_tables(pipeline, tmp_path):
    """--address local: stage 1 as sweep.py jobs and the attacks as Ray tasks give the
    records (CLEVER bounds and attack distortions, the tables' rows) of the in-process
    run, from stage-1 files equal bit for bit. One model keeps the test short."""
    import ray
    import scipy.io

    model = MODELS[0]
    base, out, save = pipeline["base"], str(tmp_path / "out"), str(tmp_path / "save")
    argv = _argv(base, "--out", out, "--save", save, "--address", "local",
                 "--num_cpus", "2", "--workers", "1")
    argv[argv.index("--models") + 1] = model
    status, _ = _run(argv)
    assert status == 0
    assert not ray.is_initialized(), "reproduce_tables must shut down the Ray it started"
    run = json.load(open(os.path.join(out, "run.json")))
    first = pipeline["first"]["run"]
    for mode in ("targeted", "untargeted"):
        ours = run["models"][model][mode]["stage1_folder"]
        theirs = first["models"][model][mode]["stage1_folder"]
        names = sorted(os.listdir(theirs))
        assert names and sorted(os.listdir(ours)) == names
        for name in names:
            a, b = scipy.io.loadmat(os.path.join(ours, name)), \
                scipy.io.loadmat(os.path.join(theirs, name))
            for key in ("G1_max", "G2_max", "Gi_max", "g_x0", "target_label"):
                assert np.array_equal(a[key], b[key]), (name, key)
        # The sweep's provenance lists every task it ran on Ray.
        prov = json.load(open(os.path.join(out, "logs", f"stage1_{model}_{mode}_sweep",
                                           "provenance.json")))
        assert prov["jobs"][0]["written"] == len(names) and prov["tasks"]
    assert run["models"][model]["attacks_computed"] == first["models"][model]["attacks_computed"]
    theirs = pd.read_csv(io.StringIO(pipeline["first"]["csv"]["records.csv"]))
    ours = pd.read_csv(os.path.join(out, "records.csv"))
    theirs = theirs[theirs["model"] == model].reset_index(drop=True)
    assert len(ours) == len(theirs) > 0
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
