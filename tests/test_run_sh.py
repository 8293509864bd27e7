"""run.sh: the original tool's interface `model modeltype nsamp niters activation order target`."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "run.sh")


def _env(tmp_path, models_dir=None, **extra):
    env = dict(os.environ, CLEVER_NO_SETUP="1", CLEVER_VENV=sys.prefix,
               CLEVER_SAVE=str(tmp_path / "lipschitz_mat"), CLEVER_LOGS=str(tmp_path / "logs"),
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    if models_dir:
        env["CLEVER_MODELS_DIR"] = models_dir
    env.update(extra)
    return env


def _run_sh(args, env, timeout=600):
    return subprocess.run(["bash", RUN_SH] + args, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("args", [
    ["digits", "normal", "128"],                                      # too few arguments
    ["digits", "normal", "128", "20", "relu", "1", "top3"],           # unknown target
    ["digits", "normal", "128", "20", "relu", "3", "top2"],           # order 1 or 2
    ["digits", "normal", "many", "20", "relu", "1", "top2"],          # nsamp not a number
])
def test_usage_errors_exit_2(args, tmp_path):
    proc = _run_sh(args, _env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "usage: ./run.sh" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "logs").exists()


def _stats(text):
    return [line for line in text.splitlines() if line.startswith("[STATS][L")]


def test_all_targets_flow_writes_its_log_and_scores_only_its_own_files(tmp_path, trained_digits):
    env = _env(tmp_path, trained_digits.dir, CLEVER_NUMIMG="2")
    first = ["digits", "normal", "128", "20", "relu", "1", "all"]
    proc = _run_sh(first, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Stage 1 as the original's run.sh calls it: --numimg, --batch_size nsamp, target 'all' =
    # top2, random and least (mask 7 here), then clever.py --untargeted on that run's files.
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("{") and "'batch_size': 128" in lines[0]
    assert "'Nsamps': 128" in lines[0] and "'target_type': 7" in lines[0]
    assert "'numimg': 2" in lines[0]
    images = [x for x in lines if x.startswith("[STATS][L1] image = ")]
    overall = [x for x in lines if x.startswith("[STATS][L0] info = untargeted")]
    assert len(images) == 2 and len(overall) == 1
    files = sorted(os.listdir(tmp_path / "lipschitz_mat" / "digits_normal"))
    assert len(files) == 6 and {f.split("_")[5] for f in files} == {"top2", "random", "least"}
    logdir = tmp_path / "logs" / "digits" / "normal"
    (log,) = os.listdir(logdir)
    assert re.fullmatch(r"digits_normal_relu_ord1_ns128_nit20_all_\d{4}_\d{6}\.log", log)
    logged = (logdir / log).read_text()
    assert _stats(logged) == _stats(proc.stdout) and overall[0] in logged

    # Another N_s in the same folder: its stage 2 reads its own files only ...
    second = _run_sh(["digits", "normal", "16", "5", "relu", "1", "all"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    folder = tmp_path / "lipschitz_mat" / "digits_normal"
    assert len(os.listdir(folder)) == 12
    assert [n for n in os.listdir(logdir) if n != log] == [
        n for n in os.listdir(logdir) if n.startswith("digits_normal_relu_ord1_ns16_nit5_all_")]
    own = tmp_path / "own" / "digits_normal"
    own.mkdir(parents=True)
    for name in os.listdir(folder):
        if name.startswith("16_5_"):
            os.link(folder / name, own / name)
    alone = _clever([str(own), "--untargeted"])
    assert _scores(second.stdout) == _scores(alone) and _scores(alone)
    # ... and the first run's numbers are unchanged with the second run's files beside them.
    after = _clever([str(folder), "--untargeted", "--match", "128_20_*_relu_order1.mat"])
    assert _scores(after) == images + overall
    assert _scores(second.stdout) != _scores(after)


def _scores(text):
    return [x for x in _stats(text) if x.startswith(("[STATS][L1] image", "[STATS][L0]"))]


def _clever(args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clever.py")] + args,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
