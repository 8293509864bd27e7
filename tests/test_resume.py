"""A rerun keeps only files made with its own settings (resume.py).

Each setting that changes the numbers, changed on a rerun into the same folder, stops the
run with one line naming the file and the setting, exit 2, every file untouched;
--overwrite recomputes; the same command skips.
"""
import os
import shutil

import pytest
import scipy.io

import collect_gradients
import resume
from common import run_cli

BASE = ["-n", "1", "--targets", "top2", "-N", "16", "-i", "3", "-q", "--no_progress"]


def _run(model, out, extra, capsys):
    status = run_cli(collect_gradients.main, collect_gradients.parse_args,
                     ["--model_path", str(model), "-s", str(out)] + BASE + extra,
                     prog="collect_gradients.py")
    return status, capsys.readouterr()


def _files(out):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".mat"))


def _state(out):
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in _files(out)}


@pytest.fixture
def first_run(tmp_path, tanh_model_path, capsys):
    out = tmp_path / "out"
    status, _ = _run(tanh_model_path, out, [], capsys)
    assert status == 0 and len(_files(out)) == 1
    return out


@pytest.mark.parametrize("extra, setting", [
    (["--radius", "0.5"], "radius"),
    (["--data_range", "-0.5", "1.5", "--radius", "3"], "data_range"),
    (["--sample_norm", "li"], "sample_norm"),
    (["--seed", "7"], "seed"),
    (["--uniform_ball"], "uniform_ball"),
    (["--transform", "defend_reduce"], "sampler"),  # the transform runs in the pool: shm
    (["--sampler", "shm"], "sampler"),
    (["--compute_slope"], "compute_slope"),
    (["--precision", "mixed_float16"], "precision"),
    (["--jit_compile"], "jit_compile"),
    (["-b", "8"], "model_batch"),
    (["--converge", "0.05"], "converge"),
])
def test_a_changed_setting_stops_the_rerun_and_changes_nothing(first_run, tanh_model_path,
                                                               extra, setting, capsys):
    before = _state(first_run)
    status, cap = _run(tanh_model_path, first_run, extra, capsys)
    err = cap.err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, cap.err
    path = next(iter(before))
    assert err[0].startswith(f"collect_gradients.py: error: {path}: made with {setting} = ")
    assert "--overwrite" in err[0] and "-s" in err[0]
    assert _state(first_run) == before


def test_transform_with_the_same_sampler_is_the_setting_named(tmp_path, tanh_model_path, capsys):
    out = tmp_path / "out"
    assert _run(tanh_model_path, out, ["--sampler", "shm"], capsys)[0] == 0
    status, cap = _run(tanh_model_path, out, ["--sampler", "shm", "--transform", "defend_reduce"],
                       capsys)
    assert status == 2 and "made with transform = ''" in cap.err


def test_another_model_under_the_same_name_is_refused(tmp_path, first_run, linear_model_path,
                                                      capsys):
    other = tmp_path / "elsewhere" / "lintanh.keras"  # the same name, other weights
    other.parent.mkdir()
    shutil.copy(linear_model_path, other)
    before = _state(first_run)
    status, cap = _run(other, first_run, [], capsys)
    assert status == 2 and ": made with model = " in cap.err
    assert _state(first_run) == before


def test_overwrite_recomputes_and_the_same_command_skips(first_run, tanh_model_path, capsys):
    before = _state(first_run)
    status, _ = _run(tanh_model_path, first_run, [], capsys)
    assert status == 0 and _state(first_run) == before  # skipped: untouched
    status, _ = _run(tanh_model_path, first_run, ["--radius", "0.5", "--overwrite"], capsys)
    assert status == 0
    path = next(iter(before))
    assert os.stat(path).st_mtime_ns != before[path][0]
    assert resume.recorded_settings(path)["radius"] == 0.5
    status, _ = _run(tanh_model_path, first_run, ["--radius", "0.5"], capsys)
    assert status == 0


def test_files_without_settings_are_kept_with_one_notice(first_run, tanh_model_path, capsys,
                                                         caplog):
    path = _files(first_run)[0]
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {k: v for k, v in mat.items()
                            if not k.startswith("__") and k != resume.SETTINGS_KEY})
    before = _state(first_run)
    status, _ = _run(tanh_model_path, first_run, ["--seed", "7"], capsys)
    assert status == 0 and _state(first_run) == before
    notices = [r for r in caplog.records if "record no settings" in r.getMessage()]
    assert len(notices) == 1


def test_first_difference_follows_the_recorded_order():
    expected = {"a": 1, "b": 2}
    assert resume.first_difference({"a": 1, "b": 2}, expected) is None
    assert resume.first_difference({"a": 3, "b": 4}, expected) == ("a", 3, 1)
    assert resume.first_difference({"a": 1}, expected) == ("b", "<not recorded>", 2)
