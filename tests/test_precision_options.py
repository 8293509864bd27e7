"""--jit_compile, --precision tf32 and --precision mixed_float16 run end to end, and their
files are what the README says: the same points as the default, maxima equal or close."""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("G1_max", "G2_max", "Gi_max")


def _stage1(model, out, extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "collect_gradients.py"),
                           "--model_path", model, "-N", "64", "-i", "6", "-n", "2", "--targets",
                           "top2,least", "-s", str(out), "-q", "--no_progress"] + extra,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".mat"))
    assert len(files) == 4
    return {os.path.basename(f): scipy.io.loadmat(f) for f in files}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tanh_model_path):
    return _stage1(tanh_model_path, tmp_path_factory.mktemp("float32"), [])


def _max_relative_difference(a, b):
    assert sorted(a) == sorted(b)
    worst = 0.0
    for name in a:
        for key in KEYS:
            x, y = a[name][key].astype(np.float64), b[name][key].astype(np.float64)
            assert x.shape == y.shape and np.all(np.isfinite(y))
            worst = max(worst, float(np.max(np.abs(x - y) / np.abs(x))))
    return worst


# (flags, largest relative difference of any stored maximum from the default's): TF32 does
# not exist on CPUs (measured: the files are the default's, bit for bit); float16 keeps
# about 3 significant digits (measured: 2.6e-2 at most on this model).
@pytest.mark.parametrize("flags, rtol", [(["--precision", "tf32"], 1e-6),
                                         (["--precision", "mixed_float16"], 5e-2)])
def test_option_runs_and_its_maxima_stay_close_to_the_default(flags, rtol, default_run,
                                                              tmp_path, tanh_model_path):
    got = _stage1(tanh_model_path, tmp_path, flags)
    worst = _max_relative_difference(default_run, got)
    print(f"{' '.join(flags)}: max relative difference {worst:.3g}")
    assert worst <= rtol
    name = next(iter(got))
    assert str(got[name]["precision"][0]) == (flags[1] if flags[0] == "--precision" else "float32")
    assert int(got[name]["jit_compile"].item()) == (flags == ["--jit_compile"])
    for name in got:  # the same run otherwise: same targets, same g(x0)
        assert got[name]["g_x0"].item() == pytest.approx(default_run[name]["g_x0"].item(), rel=1e-6)


def test_jit_compile_draws_other_points_reproducibly(default_run, tmp_path, tanh_model_path):
    """XLA's stateless random kernels give other numbers than TensorFlow's for the same seed
    (measured: maxima up to 48% apart per iteration), so --jit_compile is another sample of
    the same law: reproducible with its seed, not the default's points."""
    first = _stage1(tanh_model_path, tmp_path / "a", ["--jit_compile"])
    again = _stage1(tanh_model_path, tmp_path / "b", ["--jit_compile"])
    assert _max_relative_difference(first, again) <= 1e-6
    assert _max_relative_difference(default_run, first) > 1e-3
    for name in first:
        assert int(first[name]["jit_compile"].item()) == 1
        for key in KEYS:  # the same law: per-file means of the maxima agree to a few tens of %
            ratio = first[name][key].mean() / default_run[name][key].mean()
            assert 0.7 < ratio < 1.4, (name, key, ratio)
