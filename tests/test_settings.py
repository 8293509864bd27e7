"""settings.Stage1Settings: one frozen value of stage 1's settings, from argv or keywords."""
import dataclasses
import json
import subprocess
import sys

import pytest

import collect_gradients
import converge
import settings
from common import TargetKind, ToolError
from settings import SettingsError, Stage1Settings


def test_from_argv_equals_from_kwargs():
    argv = ["-d", "digits", "-m", "distilled", "-n", "3", "-f", "2", "-N", "64", "-i", "7",
            "--targets", "top2,least", "--radius", "0.5", "--data_range", "0", "1",
            "--seed", "9", "-b", "16", "--converge", "0.02", "--min_iters", "4",
            "--check_every", "2", "--order", "1", "--compute_slope", "--overwrite", "-vv"]
    kwargs = dict(dataset="digits", model_name="distilled", numimg=3, firstimg=2, Nsamps=64,
                  Niters=7, targets=["top2", "least"], radius=0.5, data_range=(0, 1), seed=9,
                  batch_size=16, converge=0.02, min_iters=4, check_every=2, compute_slope=True,
                  overwrite=True, verbose=2)
    a, b = Stage1Settings.from_argv(argv), Stage1Settings.from_kwargs(**kwargs)
    assert a == b
    assert a.kinds == (TargetKind.TOP2, TargetKind.LEAST)
    assert a.data_range == (0.0, 1.0) and a.sampling_radius == 0.5
    # collect_gradients' parse_args gives that value.
    assert collect_gradients.parse_args(argv) == a


def test_defaults_are_the_clis():
    s = Stage1Settings.from_kwargs()
    assert s == Stage1Settings.from_argv([])
    assert (s.dataset, s.model_name, s.numimg, s.Nsamps, s.Niters, s.seed) == \
        ("digits", "normal", 1, 1024, 500, 1215)
    assert s.radius is None and s.sampling_radius == 3.0  # the original's l2 default, width 1
    assert s.data_range == (-0.5, 0.5)
    assert s.sampler == "tf" and s.batch_size == 1024 and s.nthreads >= 1
    assert s.converge is None and converge.rule_from_settings(s) is None
    assert Stage1Settings.from_kwargs(dataset="imagenet").batch_size == 32
    assert Stage1Settings.from_kwargs(transform="defend_png").sampler == "shm"
    assert Stage1Settings.from_kwargs(data_range=(0, 255)).sampling_radius == 3.0 * 255
    assert Stage1Settings.from_kwargs(sample_norm="li").sampling_radius == pytest.approx(0.1)
    # The parser's --converge defaults are converge.ConvergenceRule's.
    d = converge.ConvergenceRule(tol=0.01)
    assert (s.min_iters, s.check_every, s.converge_noise) == \
        (d.min_iters, d.check_every, d.noise_factor)
    rule = converge.rule_from_settings(s.with_(converge=0.01))
    assert rule == d


# (argv, kwargs, the start of the message)
BAD = [
    (["-N", "-3"], {"Nsamps": -3}, "--Nsamps must be positive, got -3"),
    (["-i", "0"], {"Niters": 0}, "--Niters must be positive, got 0"),
    (["-n", "0"], {"numimg": 0}, "--numimg must be positive"),
    (["-f", "-1"], {"firstimg": -1}, "--firstimg must be non-negative"),
    (["-b", "-2"], {"batch_size": -2}, "--batch_size must be non-negative"),
    (["--nthreads", "-1"], {"nthreads": -1}, "--nthreads must be non-negative"),
    (["--radius", "-1"], {"radius": -1}, "--radius must be positive"),
    (["--data_range", "1", "0"], {"data_range": (1, 0)}, "--data_range: LO must be below HI"),
    (["--data_range", "none"], {"data_range": None}, "--data_range none: "),
    (["--data_range", "none", "--radius", "1", "--transform", "defend_png"],
     {"data_range": None, "radius": 1, "transform": "defend_png"}, "--transform: "),
    (["--compute_slope", "-N", "1"], {"compute_slope": True, "Nsamps": 1}, "--compute_slope needs"),
    (["--power_iters", "0"], {"power_iters": 0}, "--power_iters must be positive"),
    (["--converge", "-1"], {"converge": -1}, "--converge: "),
    (["--converge", "0.1", "--min_iters", "0"], {"converge": 0.1, "min_iters": 0}, "--min_iters: "),
    (["--converge", "0.1", "--check_every", "0"], {"converge": 0.1, "check_every": 0},
     "--check_every: "),
    (["--order", "2", "--compute_slope"], {"order": 2, "compute_slope": True},
     "--compute_slope applies to --order 1 only"),
    (["--targets", "top3"], {"targets": "top3"}, "--targets: unknown target 'top3'"),
    (["--target_type", "64"], {"target_type": 64}, "--target_type 64 is out of range"),
    (["--transform", "defend_png", "--sampler", "tf"], {"transform": "defend_png", "sampler": "tf"},
     "--transform runs in the sampling workers"),
    (["--transform", "defend_bogus"], {"transform": "defend_bogus"}, "--transform: unknown"),
    (["--model_path", "/nonexistent/m.keras"], {"model_path": "/nonexistent/m.keras"},
     "--model_path: /nonexistent/m.keras does not exist"),
]


@pytest.mark.parametrize("argv,kwargs,message", BAD, ids=[m.split(":")[0].split(" ")[0] + str(k)
                                                          for k, (_, _, m) in enumerate(BAD)])
def test_every_error_is_one_line_naming_the_flag_from_both_paths(argv, kwargs, message):
    flag = message.split()[0].split(":")[0]
    for build in (lambda: Stage1Settings.from_argv(argv),
                  lambda: Stage1Settings.from_kwargs(**kwargs)):
        with pytest.raises(SettingsError) as info:
            build()
        text = str(info.value)
        assert text.startswith(message), text
        assert "\n" not in text and flag in text
        assert isinstance(info.value, ToolError)


def test_keyword_errors_name_the_flag_without_argparse():
    cases = [({"Nsamp": 3}, "--Nsamp: not a setting"),
             ({"Nsamps": "many"}, "--Nsamps: invalid int value: 'many'"),
             ({"Nsamps": 2.5}, "--Nsamps: invalid int value: 2.5"),
             ({"radius": "wide"}, "--radius: invalid float value: 'wide'"),
             ({"overwrite": "yes"}, "--overwrite: expected true or false, got 'yes'"),
             ({"dataset": "svhn"}, "--dataset: invalid choice: 'svhn'"),
             ({"order": 3}, "--order: invalid choice: 3"),
             ({"data_range": "0 1 2"}, "--data_range: expected LO HI"),
             ({"target_type": "0xzz"}, "--target_type: invalid int value")]
    for kwargs, message in cases:
        with pytest.raises(SettingsError, match="^" + message.replace("(", r"\(")):
            Stage1Settings.from_kwargs(**kwargs)
    # Python values: a hex mask string, a numpy integer, a "lo,hi" string.
    import numpy as np

    s = Stage1Settings.from_kwargs(target_type="0x3", Nsamps=np.int64(8), data_range="0,255")
    assert (s.target_type, s.Nsamps, s.data_range) == (3, 8, (0.0, 255.0))
    assert type(s.Nsamps) is int


def test_argparse_errors_still_exit_2_with_the_usage_line(capsys):
    with pytest.raises(SystemExit) as info:
        Stage1Settings.from_argv(["-N", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: collect_gradients.py")
    assert err[-1] == "collect_gradients.py: error: argument -N/--Nsamps: invalid int value: 'many'"


def test_frozen_and_with_revalidates():
    s = Stage1Settings.from_kwargs(Nsamps=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.Nsamps = 32
    t = s.with_(Nsamps=32, targets="least")
    assert (t.Nsamps, t.kinds, s.Nsamps) == (32, (TargetKind.LEAST,), 16)
    with pytest.raises(SettingsError, match="^--Nsamps must be positive"):
        s.with_(Nsamps=0)
    with pytest.raises(SettingsError, match="^--Nsam: not a setting"):
        s.with_(Nsam=3)
    assert hash(s) == hash(Stage1Settings.from_kwargs(Nsamps=16))
    # The constructor validates too: an invalid value never exists.
    with pytest.raises(SettingsError, match="^--Niters must be positive"):
        dataclasses.replace(s, Niters=-1)


def test_record_round_trips_through_json():
    s = Stage1Settings.from_kwargs(targets="top2,random", data_range=(0, 1), radius=0.25,
                                   converge=0.05, labels_file=None, input_size=None)
    rec = s.record()
    assert rec["targets_resolved"] == "top2,random"
    assert rec["model_path"] == "" and rec["data_range"] == [0.0, 1.0]
    back = json.loads(json.dumps(rec))
    assert back == rec
    assert Stage1Settings.from_record(back) == s
    unbounded = Stage1Settings.from_kwargs(data_range=None, radius=1.0)
    assert Stage1Settings.from_record(json.loads(json.dumps(unbounded.record()))) == unbounded
    # The record's keys: every field, in the CLI's order, then targets_resolved.
    assert list(rec) == [f.name for f in dataclasses.fields(s)] + ["targets_resolved"]


def test_given_flags_are_only_those_on_the_line():
    assert settings.given_flags(["-N", "8", "--overwrite", "--data_range", "0", "1"]) == \
        {"Nsamps": 8, "overwrite": True, "data_range": ["0", "1"]}
    assert settings.given_flags([]) == {}
    with pytest.raises(SettingsError, match="unrecognized arguments: --bogus"):
        settings.given_flags(["--bogus", "1"])
    with pytest.raises(SettingsError, match="argument -N/--Nsamps: invalid int value"):
        settings.given_flags(["-N", "x"])


def test_settings_imports_without_tensorflow_or_scipy():
    code = ("import sys, settings; s = settings.Stage1Settings.from_kwargs(); "
            "assert 'tensorflow' not in sys.modules; assert 'keras' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
