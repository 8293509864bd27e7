"""Order 2: batches whose power iteration stops at --power_iters without converging are
counted in every file and reported once per run."""
import os
import subprocess
import sys

import scipy.io

import stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _order2(tanh_model_path, out, power_iters):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "collect_gradients.py"),
                           "--model_path", tanh_model_path, "--order", "2", "--power_iters",
                           str(power_iters), "-N", "32", "-i", "4", "-n", "1", "--targets",
                           "top2,least", "-s", str(out), "-q", "--no_progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".mat"))
    assert len(files) == 2
    return proc.stderr, [scipy.io.loadmat(f) for f in files]


def test_three_power_steps_cannot_converge_and_the_run_says_so(tmp_path, tanh_model_path):
    # A 64-dimensional tanh network: three steps from a random start vector are far from the
    # 1e-3 convergence test, so every batch stops at the cap.
    err, mats = _order2(tanh_model_path, tmp_path / "capped", 3)
    for mat in mats:
        assert int(mat["power_iters"].item()) == 3
        assert int(mat["power_capped_batches"].item()) == mat["H2_max"].size == 4
    warnings = [ln for ln in err.splitlines() if "--power_iters 3 without converging" in ln]
    assert len(warnings) == 1, err[-2000:]
    assert "2 of 2 files" in warnings[0] and "8 batches" in warnings[0]


def test_the_warning_names_only_files_that_hit_the_cap():
    assert stage1.power_cap_warning({"a.mat": 0, "b.mat": 0}, 500) is None
    text = stage1.power_cap_warning({"x/a.mat": 0, "x/b.mat": 5}, 20)
    assert text.startswith("1 of 2 files") and "5 batches" in text and "b.mat" in text
