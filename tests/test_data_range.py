"""--data_range LO HI: a model on inputs in [lo, hi] is scored in its own range (issue 24 item 2).

Known answer: a model taking [lo, hi] (x -> (x - lo) / (hi - lo) - 0.5 in front of a
[-0.5, 0.5] network) scored with ``--data_range lo hi`` sees, point for point, what the
inner network sees at the default range. The images are scaled by hi - lo, and so is the
default radius; every sampler draws its perturbation as a unit-radius draw times the
radius, from the same seeds, so each sampled point is the inner run's point mapped
affinely, clipping included (the clip bounds map onto each other). The inner network's
gradients are (hi - lo) times the outer's and g(x0) is the same, so the outer bounds
are the inner's times (hi - lo). Not bit for bit: the affine maps round in float32
(x0, the points and the Rescaling layer each round once), hence a 1e-4 tolerance.
"""
import json
import os

import numpy as np
import pytest
import scipy.io

import clever
import collect_gradients
from common import run_cli
from conftest import model_in_range

SMALL = ["-n", "2", "--targets", "top2,least", "-N", "32", "-i", "20", "-q", "--no_progress"]
KEYS = ("G1_max", "G2_max", "Gi_max")


def _collect(model, out, extra=()):
    argv = ["--model_path", str(model), "-s", str(out)] + SMALL + list(extra)
    assert collect_gradients.main(collect_gradients.parse_args(argv)) == 0
    folder = os.path.join(str(out), "digits_" + os.path.splitext(os.path.basename(str(model)))[0])
    return {f: scipy.io.loadmat(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}, folder


def _fragile(samples):
    """True when a fit of ``samples`` moves by more than 1e-5 relative under a perturbation
    of 1e-6 relative (float32 rounding of the outer model's maxima is of that size): on
    20 batches two starts can reach near-equal p-values, or Nelder-Mead another optimum,
    so such a file says nothing about the range's scaling."""
    from weibull_fit import fit_reverse_weibull

    s = np.asarray(samples, np.float64)
    a = fit_reverse_weibull(s).estimate
    b = fit_reverse_weibull(s * (1 + 1e-6 * np.sin(np.arange(s.size)))).estimate
    return not abs(a - b) <= 1e-5 * abs(a)


def _bounds(folder):
    """{file name: {norm: (bound, uncapped bound, fragile fit)}} from stage 2 (clever.score_folder)."""
    result = clever.score_folder(folder)
    fragile = {(os.path.basename(fs.file.path), n.label): _fragile(fs.file.maxima[n])
               for fs in result.files for n in fs.scores}
    records = clever.file_records(result)
    return {os.path.basename(r["path"]): {
        n: (v["bound"], v["bound_uncapped"], fragile[os.path.basename(r["path"]), n])
        for n, v in r["norms"].items()} for r in records}, records


@pytest.mark.parametrize("lo, hi, extra", [
    (0.0, 1.0, []),
    (0.0, 255.0, []),
    (0.0, 255.0, ["--sampler", "shm", "--sample_norm", "li", "--nthreads", "1"]),
])
def test_a_model_in_its_own_range_gives_the_inner_networks_bounds_times_the_width(
        tmp_path, tanh_model_path, lo, hi, extra):
    width = hi - lo
    outer = model_in_range(tanh_model_path, lo, hi, tmp_path / "outer.keras")
    inner_files, inner_dir = _collect(tanh_model_path, tmp_path / "inner", extra)
    outer_files, outer_dir = _collect(outer, tmp_path / "outer",
                                      extra + ["--data_range", f"{lo:g}", f"{hi:g}"])
    assert sorted(inner_files) == sorted(outer_files) and len(inner_files) == 4
    for name, a in inner_files.items():
        b = outer_files[name]
        assert b["radius"].item() == pytest.approx(a["radius"].item() * width, rel=1e-12)
        np.testing.assert_array_equal(b["data_range"].ravel(), [lo, hi])
        np.testing.assert_array_equal(a["data_range"].ravel(), [-0.5, 0.5])
        # g_x0 is a difference of two float32 logits: the Rescaling layer's rounding
        # (about 1e-7 absolute) is a larger share of a small margin.
        np.testing.assert_allclose(b["g_x0"], a["g_x0"], rtol=1e-4, atol=1e-6)
        for key in KEYS:  # the outer gradient is the inner's / width, point for point
            np.testing.assert_allclose(b[key] * width, a[key], rtol=1e-4, err_msg=(name, key))
        assert json.loads(str(b["settings"][0]))["data_range"] == [lo, hi]
    inner_bounds, _ = _bounds(inner_dir)
    outer_bounds, records = _bounds(outer_dir)
    compared = 0
    for name, norms in inner_bounds.items():
        for norm, (bound, uncapped, unstable) in norms.items():
            got = outer_bounds[name][norm]
            if unstable or got[2]:
                continue
            compared += 1
            assert got[0] == pytest.approx(bound * width, rel=1e-4), (name, norm)
            assert got[1] == pytest.approx(uncapped * width, rel=1e-4), (name, norm)
    assert compared >= 8, f"only {compared} of 12 fits are stable"
    assert all(r["data_range"] == [lo, hi] for r in records)  # stage 2 shows the range


def test_default_range_is_the_original_and_none_takes_no_clipping(tmp_path, tanh_model_path):
    args = collect_gradients.parse_args([])
    assert args.data_range == (-0.5, 0.5)
    files, folder = _collect(tanh_model_path, tmp_path / "none",
                             ["--data_range", "none", "--radius", "2"])
    for mat in files.values():
        assert mat["radius"].item() == 2.0
        assert np.isinf(mat["data_range"]).all()
        assert json.loads(str(mat["settings"][0]))["data_range"] is None
    _, records = _bounds(folder)
    assert all(r["data_range"] is None for r in records)


# --------------------------------------------------------------------------
# Every sampled point within [lo, hi]
# --------------------------------------------------------------------------
def _centred_square(mid):
    """Logits [0.5 ||x - mid||^2, 0]: the gradient is x - mid, its L-inf norm max |x_i - mid|."""
    import tensorflow as tf

    def model(x, training=False):
        flat = tf.reshape(x, [tf.shape(x)[0], -1]) - mid
        g = 0.5 * tf.reduce_sum(flat * flat, axis=1)
        return tf.stack([g, tf.zeros_like(g)], axis=1)

    return model


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("lo, hi", [(0.0, 255.0), (-3.0, -2.0)])
def test_sampled_points_stay_within_the_range(lo, hi, pooled):
    """Gi_max = max over the points of max_i |x_i - mid| is (hi - lo) / 2 exactly when
    the points reach the range's edges and never pass them; a radius 10 times the
    range's width would carry unclipped points far beyond."""
    from estimate_gradient_norm import GradientNormEstimator
    from randsphere import BallSampler, SamplerPool

    mid = (lo + hi) / 2
    shape = (4, 4, 1)
    x0 = np.random.default_rng(0).uniform(lo, hi, shape).astype(np.float32)
    sampler = BallSampler.create("li", 10 * (hi - lo))
    est = GradientNormEstimator(_centred_square(mid), shape, 16, clip=(lo, hi))
    pool = SamplerPool(sampler, shape, 16, 1, clip=(lo, hi)) if pooled else None
    try:
        stats = list(est.iterate(x0, 0, [1], 16, 4, 1215, 0, sampler, pool))
    finally:
        if pool is not None:
            pool.close()
    gi = np.array([s.grad_max[0, 2] for s in stats])
    np.testing.assert_allclose(gi, (hi - lo) / 2, rtol=1e-6)
    # Unclipped (a model on unbounded inputs) the same draws go far past the edges.
    free = GradientNormEstimator(_centred_square(mid), shape, 16, clip=None)
    far = [s.grad_max[0, 2] for s in free.iterate(x0, 0, [1], 16, 4, 1215, 0, sampler)]
    assert min(far) > 2 * (hi - lo)


def test_numpy_points_and_transformations_work_in_the_range():
    from randsphere import BallSampler, bpda_points

    x0 = np.random.default_rng(1).uniform(0, 255, (6, 6, 1)).astype(np.float32)
    sampler = BallSampler.create("l2", None, False, (0.0, 255.0))
    assert sampler.radius == pytest.approx(3.0 * 255)
    plain = bpda_points(sampler, x0, (1215, 0, 0, 0), 64, None, clip=(0.0, 255.0))
    assert plain.min() == 0.0 and plain.max() == 255.0  # reach the edges, never pass them
    reduced = bpda_points(sampler, x0, (1215, 0, 0, 0), 64, "defend_reduce", clip=(0.0, 255.0))
    # Bit-depth reduction in [0, 255]: the levels k * 32 / 255 of [0, 1], times 255.
    assert reduced.min() >= 0.0 and reduced.max() <= 224.0 + 1e-3
    np.testing.assert_allclose(reduced / 32, np.round(reduced / 32), atol=1e-4)
    assert len(np.unique(np.round(reduced / 32))) > 2


# --------------------------------------------------------------------------
# Flags, files, resume
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, start", [
    (["--data_range", "1", "0"], "--data_range: LO must be below HI"),
    (["--data_range", "0", "inf"], "--data_range: LO must be below HI"),
    (["--data_range", "0"], "--data_range: expected LO HI"),
    (["--data_range", "0", "1", "2"], "--data_range: expected LO HI"),
    (["--data_range", "a", "b"], "--data_range: expected LO HI"),
    (["--data_range", "none"], "--data_range none: "),
    (["--data_range", "none", "--radius", "1", "--transform", "defend_reduce"], "--transform: "),
])
def test_a_bad_data_range_fails_in_one_line(argv, start, capsys):
    status = run_cli(collect_gradients.main, collect_gradients.parse_args, argv,
                     prog="collect_gradients.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("collect_gradients.py: error: " + start), err[0]
    if "none" in argv and "--radius" not in argv:
        assert "--radius" in err[0]


def test_range_forms_of_the_flag_and_of_a_sweep_spec():
    parse = collect_gradients.parse_args
    assert parse(["--data_range", "0", "255"]).data_range == (0.0, 255.0)
    assert parse(["--data_range", "-1", "1"]).data_range == (-1.0, 1.0)
    assert parse(["--data_range", "0,255"]).data_range == (0.0, 255.0)  # a spec's list
    assert parse(["--data_range", "None", "--radius", "1"]).data_range is None
    assert parse(["--radius", "1", "--data_range", "0", "2"]).radius == 1.0


def test_files_recorded_before_the_range_count_as_the_default_range(tmp_path, tanh_model_path,
                                                                   capsys):
    """A rerun with another range is refused like any setting (tests/test_resume.py); a file
    whose settings predate the range (no data_range key) was made with [-0.5, 0.5]."""
    out = tmp_path / "out"
    base = ["--model_path", tanh_model_path, "-s", str(out), "-n", "1", "--targets", "top2",
            "-N", "16", "-i", "3", "-q", "--no_progress"]
    run = lambda extra: run_cli(collect_gradients.main, collect_gradients.parse_args,  # noqa: E731
                                base + extra, prog="collect_gradients.py")
    assert run([]) == 0
    path = next(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".mat"))
    mat = scipy.io.loadmat(path)
    settings = json.loads(str(mat["settings"][0]))
    del settings["data_range"]
    mat["settings"] = json.dumps(settings)
    scipy.io.savemat(path, {k: v for k, v in mat.items() if not k.startswith("__")})
    before = open(path, "rb").read()
    capsys.readouterr()
    assert run([]) == 0  # kept: the same settings
    assert open(path, "rb").read() == before
    assert run(["--data_range", "0", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"collect_gradients.py: error: {path}: made with data_range = [-0.5, 0.5], this run has "
        "data_range = [0.0, 1.0]")
