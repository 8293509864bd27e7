"""sweep.py on a simulated two-node Ray cluster (two nodes of 1 CPU each, this machine).

The sweeps are small (a linear and a tanh-of-linear digits classifier, a few
images, -N 16): what is checked is the engine, not the numbers. Files must
equal collect_gradients.py's bit for bit; faults (a worker killed mid-sweep,
the driver killed with SIGKILL, a model that does not load) must lose nothing
and write nothing twice.
"""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import scipy.io

ray = pytest.importorskip("ray")

import collect_gradients  # noqa: E402
import resume  # noqa: E402
import sweep  # noqa: E402
import sweep_summary  # noqa: E402
from sweep_summary import MIN_OVER_TARGETS, UNTARGETED  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["-d", "digits", "-N", "16", "-i", "5", "--no_progress", "-q"]
#: Enough iterations that an image takes about a second: faults land mid-task.
SLOW = ["-d", "digits", "-N", "16", "-i", "300", "--no_progress", "-q"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):
        # Ray gives a node 30 s to register; on a loaded 2-core machine that can run out.
        c = Cluster(initialize_head=False)
        try:
            c.add_node(num_cpus=1, include_dashboard=False)
            c.add_node(num_cpus=1)
            c.wait_for_nodes()
            break
        except Exception:  # noqa: BLE001 - start again from scratch
            c.shutdown()
            if attempt == 2:
                raise
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _mats(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.mat"), recursive=True))


def _sweep_cmd(cluster, models, save, out, extra, hold=()):
    # hold: tests/hold.py holds the driver inside once its first file is written
    # (until the release file exists, or a signal), so a fault lands mid-sweep.
    driver = [os.path.join(ROOT, "tests", "hold.py"), *hold] if hold else []
    return [sys.executable, *driver, os.path.join(ROOT, "sweep.py"), "--address", cluster.address,
            "--workers", "2", "--models", models, "-s", str(save), "--out", str(out)] + extra


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def _wait_for_hold(proc):
    for line in proc.stderr:
        if line.startswith("[HOLD]"):
            return line
    raise AssertionError("the sweep ended without writing a file")


def test_sweep_matches_collect_gradients_on_two_nodes(cluster, tmp_path, linear_model_path,
                                                      tanh_model_path, capsys):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip archive")
    save, out = tmp_path / "sweep", tmp_path / "out"
    args = sweep.parse_args(["--address", cluster.address, "--workers", "2", "--models",
                             f"{linear_model_path},{bad},{tanh_model_path}", "-n", "3",
                             "-s", str(save), "--out", str(out)] + SMALL)
    status = sweep.main(args)
    err = capsys.readouterr().err
    # The broken model fails its own job with one line; the others complete.
    assert status == 1
    lines = [ln for ln in err.splitlines() if "broken.keras" in ln]
    assert len(lines) == 1 and lines[0].startswith("sweep.py: error: "), err[-2000:]

    for model in (linear_model_path, tanh_model_path):
        ref = tmp_path / "ref"
        collect_gradients.main(collect_gradients.parse_args(
            ["--model_path", model, "-n", "3", "-s", str(ref)] + SMALL))
        name = "digits_" + os.path.splitext(os.path.basename(model))[0]
        mine = sorted(os.listdir(save / name))
        theirs = sorted(os.listdir(ref / name))
        assert mine == theirs and len(mine) >= 6
        for f in mine:
            a = scipy.io.loadmat(save / name / f)
            b = scipy.io.loadmat(ref / name / f)
            for key in ("G1_max", "G2_max", "Gi_max", "g_x0", "pred"):
                assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), \
                    (f, key)

    prov = json.load(open(out / "provenance.json"))
    assert prov["cluster"]["nodes"] == 2
    score_nodes = {t["node"] for t in prov["tasks"] if t["kind"] == "score"}
    assert len(score_nodes) == 2, "both nodes ran scoring tasks"
    states = {j["model"]: j["state"] for j in prov["jobs"]}
    assert states == {"linear": "done", "broken": "failed", "lintanh": "done"}
    summary = open(out / "summary.csv").read().splitlines()
    assert summary[0].startswith("job,model,dataset,info,norm,mean_clever,min_clever")
    rows = list(csv.DictReader(summary))
    # one job per model: the job is the model's output folder name
    assert {(r["job"], r["model"]) for r in rows} == {("digits_linear", "linear"),
                                                      ("digits_lintanh", "lintanh")}
    # Stage 2 agrees with clever.py's own fit of the same file.
    import clever

    rec = json.load(open(out / "records.json"))[0]
    f = clever.load_stage1_file(rec["path"])
    fit = clever.fit_reverse_weibull(f.maxima[clever.Norm.L2])
    assert rec["norms"]["L2"]["bound_uncapped"] == pytest.approx(
        clever.clever_bound(f.g_x0, fit.estimate), rel=1e-12)


def test_a_sweep_in_a_models_own_range_matches_collect_gradients(cluster, tmp_path,
                                                                 tanh_model_path):
    """--data_range reaches the workers: images scaled, radius, clipping (pool too)."""
    from conftest import model_in_range

    model = model_in_range(tanh_model_path, 0.0, 255.0, tmp_path / "in255.keras")
    flags = ["-n", "1", "--targets", "top2", "--data_range", "0", "255", "--sampler", "shm",
             "--nthreads", "1"] + SMALL
    args = sweep.parse_args(["--address", cluster.address, "--workers", "1", "--models", model,
                             "-s", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
                             "--no_stage2"] + flags)
    assert sweep.main(args) == 0
    collect_gradients.main(collect_gradients.parse_args(
        ["--model_path", model, "-s", str(tmp_path / "ref")] + flags))
    mine, theirs = _mats(tmp_path / "sweep"), _mats(tmp_path / "ref")
    assert [os.path.basename(f) for f in mine] == [os.path.basename(f) for f in theirs] != []
    for f, g in zip(mine, theirs):
        a, b = scipy.io.loadmat(f), scipy.io.loadmat(g)
        assert a["radius"].item() == 3.0 * 255 and a["data_range"].tolist() == [[0.0, 255.0]]
        for key in ("G1_max", "G2_max", "Gi_max", "g_x0", "pred", "settings"):
            assert a[key].tobytes() == b[key].tobytes(), (f, key)


def test_a_killed_worker_loses_nothing(cluster, tmp_path, tanh_model_path):
    save, out = tmp_path / "sweep", tmp_path / "out"
    release = tmp_path / "release"
    proc = subprocess.Popen(_sweep_cmd(cluster, tanh_model_path, save, out,
                                       ["-n", "5", "--no_stage2"] + SLOW,
                                       hold=("--release", str(release))),
                            cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_hold(proc)
        ray.init(address=cluster.address, namespace=sweep.NAMESPACE)
        try:
            pid = None
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if not entry["name"].startswith("clever-sweep-"):
                    continue
                try:
                    victim = ray.get_actor(entry["name"], namespace=entry["namespace"])
                    # pid() answers at once, even while the actor scores an image.
                    pid = ray.get(victim.pid.remote(), timeout=60)
                    break
                except (ValueError, ray.exceptions.RayError):
                    continue  # that actor has just ended
            assert pid is not None, ray.util.list_named_actors(all_namespaces=True)
            os.kill(pid, signal.SIGKILL)
        finally:
            ray.shutdown()
            release.touch()  # the driver goes on, with one worker dead
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    files = _mats(save)
    for f in files:
        assert "G2_max" in scipy.io.loadmat(f)
    prov = json.load(open(out / "provenance.json"))
    assert prov["worker_deaths"] >= 1
    written = [p for t in prov["tasks"] if t["kind"] == "score" for p in t["files"]]
    assert len(written) == len(set(written)), "a file was written twice"
    assert sorted(os.path.abspath(p) for p in written) == sorted(map(os.path.abspath, files))
    ids = {os.path.basename(f).split("_")[2] for f in files}
    assert len(files) == 3 * len(ids) and len(ids) >= 4
    assert f"sweep: {len(files)} files written, 0 skipped, 0 failed" in stdout


def test_a_killed_driver_resumes(cluster, tmp_path, tanh_model_path):
    save, out = tmp_path / "sweep", tmp_path / "out"
    cmd = _sweep_cmd(cluster, tanh_model_path, save, out, ["-n", "5", "--no_stage2"] + SLOW)
    proc = subprocess.Popen(_sweep_cmd(cluster, tanh_model_path, save, out,
                                       ["-n", "5", "--no_stage2"] + SLOW, hold=("--after", "1")),
                            cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_hold(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {f: os.stat(f).st_mtime_ns for f in _mats(save)}
    for f in first:  # only complete files: each one reads
        assert "G2_max" in scipy.io.loadmat(f)
    assert not os.path.exists(out / "provenance.json")

    rerun = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    files = _mats(save)
    ids = {os.path.basename(f).split("_")[2] for f in files}
    assert len(files) == 3 * len(ids) and len(ids) >= 4
    line = rerun.stdout.strip().splitlines()[-1]
    assert line == (f"sweep: {len(files) - len(first)} files written, {len(first)} skipped, "
                    "0 failed")
    for f, mtime in first.items():  # kept, not recomputed
        assert os.stat(f).st_mtime_ns == mtime
    assert not glob.glob(os.path.join(save, "**", "*.part"), recursive=True)


def test_default_address_starts_its_own_ray_beside_a_running_cluster(cluster):
    """--address '' starts Ray on this machine, as its help says: a bare ray.init() would
    join the cluster that was started last here (this module's) and refuse num_cpus."""
    code = ("import sys, ray, sweep\n"
            "started = sweep.connect(sweep.parse_args(sys.argv[1:]))\n"
            "print(started, ray.get_runtime_context().gcs_address,"
            " ray.cluster_resources().get('CPU'))\n"
            "ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--num_cpus", "3", "--models", "x"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    started, address, cpus = proc.stdout.split()[-3:]
    assert started == "True" and address != cluster.address and float(cpus) == 3.0


def test_bad_flags_fail_in_one_line():
    from common import ToolError

    with pytest.raises(ToolError, match="^-m: .*--models"):
        sweep.parse_args(["--models", "normal", "-m", "normal"])
    with pytest.raises(ToolError, match="--models"):
        sweep.parse_args(["-d", "digits"])
    with pytest.raises(ToolError, match="unrecognized arguments: --bogus"):
        sweep.parse_args(["--models", "normal", "--bogus", "1"])


def test_spec_file_lists_jobs(tmp_path, linear_model_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'[defaults]\nNsamps = 16\nNiters = 5\n\n[[job]]\nmodels = ["{linear_model_path}"]\n'
                    f'numimg = 2\n\n[[job]]\nmodels = ["{linear_model_path}"]\nsave = "{tmp_path}/b"\n'
                    'targets = ["top2", "least"]\ndata_range = [0, 255]\n')
    args = sweep.parse_args(["--spec", str(spec), "-d", "digits"])
    jobs = sweep.build_jobs(args)
    assert [j.error for j in jobs] == ["", ""]
    assert [j.settings.numimg for j in jobs] == [2, 1]
    assert [j.settings.Nsamps for j in jobs] == [16, 16]
    assert [j.settings.data_range for j in jobs] == [(-0.5, 0.5), (0.0, 255.0)]
    assert jobs[1].out_dir == os.path.join(str(tmp_path), "b", "digits_linear")
    assert [k.value for k in jobs[1].settings.kinds] == ["top2", "least"]


def test_a_rerun_with_another_radius_is_refused_before_its_tasks(cluster, tmp_path,
                                                                 tanh_model_path, capsys):
    from common import run_cli

    save, out = tmp_path / "sweep", tmp_path / "out"
    argv = ["--address", cluster.address, "--workers", "1", "--models", tanh_model_path,
            "-n", "1", "--targets", "top2", "-s", str(save), "--out", str(out), "--no_stage2"]
    assert run_cli(sweep.main, sweep.parse_args, argv + SMALL, prog="sweep.py") == 0
    files = _mats(save)
    assert len(files) == 1
    before = {f: open(f, "rb").read() for f in files}
    capsys.readouterr()
    status = run_cli(sweep.main, sweep.parse_args, argv + SMALL + ["--radius", "0.5"],
                     prog="sweep.py")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sweep.py:")]
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"sweep.py: error: {files[0]}: made with radius = ")
    assert {f: open(f, "rb").read() for f in _mats(save)} == before
    # the same settings skip; --overwrite recomputes
    assert run_cli(sweep.main, sweep.parse_args, argv + SMALL, prog="sweep.py") == 0
    assert {f: open(f, "rb").read() for f in _mats(save)} == before
    assert run_cli(sweep.main, sweep.parse_args, argv + SMALL + ["--radius", "0.5", "--overwrite"],
                   prog="sweep.py") == 0
    assert resume.recorded_settings(files[0])["radius"] == 0.5


# --------------------------------------------------------------------------
# Summaries per job
# --------------------------------------------------------------------------
def test_job_labels_name_the_settings_that_differ():
    from sweep_jobs import job_labels

    labels = job_labels([
        ("digits_m", {"radius": 0.5, "seed": 1, "save": "a", "overwrite": False}),
        ("digits_m", {"radius": None, "seed": 1, "save": "b", "overwrite": True}),
        ("digits_other", {"radius": 0.5, "save": "a"}),
        ("digits_twice", {"seed": 3, "save": "a"}),
        ("digits_twice", {"seed": 3, "save": "b"})])
    assert labels == [("digits_m radius=0.5", {"radius": 0.5}),
                      ("digits_m radius=default", {"radius": None}),
                      ("digits_other", {}),            # alone with its model: no settings
                      ("digits_twice save=a", {"save": "a"}),   # nothing else tells them apart
                      ("digits_twice save=b", {"save": "b"})]


def _stage2_record(job, img, info, target, l2, pval=0.5, status="fit"):
    norms = {label: {"bound": min(v, 1.0), "bound_uncapped": v, "pval": pval, "status": status}
             for label, v in (("L1", 10 * l2), ("L2", l2), ("Li", l2 / 10))}
    return {"job": job, "model": "m", "dataset": "digits", "id": img, "info": info,
            "target_label": target, "norms": norms}


def _row(rows, job, info, norm):
    found = [r for r in rows if (r["job"], r["info"], r["norm"]) == (job, info, norm)]
    assert len(found) == 1, (job, info, norm, rows)
    return found[0]


def test_summarize_keeps_jobs_apart_and_names_its_minimum_rows():
    a, b, u = "digits_m radius=0.5", "digits_m radius=2.0", "digits_u"
    recs = [_stage2_record(a, 0, "top2", 3, 0.4), _stage2_record(a, 0, "least", 5, 0.9),
            _stage2_record(a, 1, "top2", 2, 0.6, pval=0.01),
            _stage2_record(a, 1, "least", 7, 0.2, status="ill_conditioned"),
            # job b: the same model and images, smaller bounds: never in a's minima
            _stage2_record(b, 0, "top2", 3, 0.1), _stage2_record(b, 0, "least", 5, 0.05),
            _stage2_record(b, 1, "top2", 2, 0.15), _stage2_record(b, 1, "least", 7, 0.12)]
    recs += [_stage2_record(u, 0, f"class{j}", j, 0.3 + 0.1 * j) for j in (0, 2, 3)]
    rows = sweep_summary.summarize(recs)
    assert len([r for r in rows if r["info"] == "top2"]) == 6      # 3 norms x 2 jobs
    top2 = _row(rows, a, "top2", "L2")
    assert top2["mean_clever"] == pytest.approx(0.5, rel=1e-15) and top2["min_clever"] == 0.4
    assert (top2["images"], top2["files"], top2["ks_pass_rate"]) == (2, 2, 0.5)
    # per image the minimum over top2 and least, then over images: (0.4 + 0.2) / 2
    low = _row(rows, a, MIN_OVER_TARGETS, "L2")
    assert low["mean_clever"] == pytest.approx(0.3, rel=1e-15) and low["min_clever"] == 0.2
    assert (low["images"], low["files"], low["fallbacks"]) == (2, 4, 1)
    # capped and uncapped are minimised field by field: L1 bounds 4, 9 / 6, 2 capped at 1
    low1 = _row(rows, a, MIN_OVER_TARGETS, "L1")
    assert (low1["mean_clever"], low1["mean_clever_uncapped"]) == pytest.approx((1.0, 3.0))
    assert _row(rows, b, MIN_OVER_TARGETS, "L2")["mean_clever"] == pytest.approx(0.085)
    # only the class<j> job has an untargeted row, and no per-class or min_over_targets rows
    assert {r["info"] for r in rows if r["job"] == u} == {UNTARGETED}
    unt = _row(rows, u, UNTARGETED, "L2")
    assert (unt["mean_clever"], unt["images"], unt["files"]) == (0.3, 1, 3)
    assert not [r for r in rows if r["job"] != u and r["info"] == UNTARGETED]


def _clever_summary(folder, path, *flags):
    import clever

    assert clever.main(clever.parse_args([str(folder), "--summary", str(path), "--nthreads", "1",
                                          *flags])) == 0
    return json.load(open(path))


def _check_rows_against_clever(rows, doc, info):
    """A job's sweep rows under ``info`` equal clever.py's aggregates and per-file records."""
    agg = {a["info"]: a for a in doc["aggregates"] if a["level"] == "L0"}[
        "untargeted" if info in (MIN_OVER_TARGETS, UNTARGETED) else info]
    for row in rows:
        assert float(row["mean_clever"]) == pytest.approx(agg[f"clever_{row['norm']}"],
                                                          rel=1e-9), row
    if info not in (MIN_OVER_TARGETS, UNTARGETED):
        for row in rows:
            norms = [r["norms"][row["norm"]] for r in doc["records"] if r["info"] == info]
            assert int(row["files"]) == len(norms)
            assert float(row["min_clever"]) == pytest.approx(min(n["bound"] for n in norms),
                                                             rel=1e-9)
            assert float(row["mean_clever_uncapped"]) == pytest.approx(
                np.mean([n["bound_uncapped"] for n in norms]), rel=1e-9)


def test_two_jobs_of_one_model_get_their_own_rows(cluster, tmp_path, linear_model_path,
                                                  tanh_model_path, capsys):
    """Two jobs of one model file that differ only in radius: separate rows, each equal to
    clever.py on that job's own folder; a --targets all job gets the untargeted row."""
    spec = tmp_path / "sweep.toml"
    targets = '["top2", "random", "least"]'
    spec.write_text(
        f'[defaults]\nnumimg = 2\n\n'
        f'[[job]]\nmodels = ["{tanh_model_path}"]\nradius = 0.5\ntargets = {targets}\n'
        f'save = "{tmp_path}/a"\n\n'
        f'[[job]]\nmodels = ["{tanh_model_path}"]\nradius = 2.0\ntargets = {targets}\n'
        f'save = "{tmp_path}/b"\n\n'
        f'[[job]]\nmodels = ["{linear_model_path}"]\ntargets = ["all"]\nnumimg = 1\n'
        f'save = "{tmp_path}/c"\n')
    out = tmp_path / "out"
    args = sweep.parse_args(["--address", cluster.address, "--workers", "2", "--spec", str(spec),
                             "--out", str(out)] + SMALL)
    assert sweep.main(args) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    jobs = {"digits_lintanh radius=0.5": tmp_path / "a",
            "digits_lintanh radius=2.0": tmp_path / "b"}
    assert len([r for r in rows if r["info"] == "top2"]) == 6
    assert {r["job"] for r in rows} == set(jobs) | {"digits_linear"}
    assert {r["model"] for r in rows if r["job"] in jobs} == {"lintanh"}
    for rec in json.load(open(out / "records.json")):
        assert rec["job_settings"] == ({"radius": 0.5} if rec["job"].endswith("0.5") else
                                       {"radius": 2.0} if rec["job"] in jobs else {})
    for job, save in jobs.items():
        folder = save / "digits_lintanh"
        targeted = _clever_summary(folder, tmp_path / "t.json")
        per_image = _clever_summary(folder, tmp_path / "u.json", "--untargeted")
        for info in ("least", "random", "top2", MIN_OVER_TARGETS):
            mine = [r for r in rows if (r["job"], r["info"]) == (job, info)]
            assert [r["norm"] for r in mine] == ["L1", "L2", "Li"]
            _check_rows_against_clever(mine, per_image if info == MIN_OVER_TARGETS
                                       else targeted, info)
        assert not [r for r in rows if (r["job"], r["info"]) == (job, UNTARGETED)]
    # the radius changes the numbers: the two jobs were not merged into one
    a, b = ([float(r["mean_clever_uncapped"]) for r in rows
             if (r["job"], r["info"], r["norm"]) == (job, "top2", "L2")][0] for job in jobs)
    assert a != b
    unt = [r for r in rows if r["job"] == "digits_linear"]
    assert [(r["info"], r["norm"]) for r in unt] == [(UNTARGETED, n)
                                                     for n in ("L1", "L2", "Li")]
    assert {int(r["files"]) for r in unt} == {9}          # every other class of a 10-class model
    doc = _clever_summary(tmp_path / "c" / "digits_linear", tmp_path / "c.json", "--untargeted")
    assert [a["n_classes"] for a in doc["aggregates"] if a["level"] == "L1"] == [10]
    _check_rows_against_clever(unt, doc, UNTARGETED)
