"""Stage 1's settings as one frozen value: :class:`Stage1Settings`.

Every flag of ``collect_gradients.py`` that shapes a run (data, model, images,
targets, sampling, order, transformation, precision, convergence, data range,
output) is a field named after the flag's long name. A value is built, and
validated, in one place (:meth:`Stage1Settings.from_kwargs`), whichever way it
comes in:

* from a command line: :meth:`Stage1Settings.from_argv` (``collect_gradients.py``;
  argparse errors exit 2 with its usage line, as every script does);
* from a sweep's job: :func:`given_flags` (a sweep's shared flags, only those
  given) merged with the job's ``--spec`` table, then ``from_kwargs``;
* from Python keywords: ``Stage1Settings.from_kwargs(Nsamps=256, targets="top2,least",
  data_range=(0, 1))``.

Bad values raise :class:`SettingsError`: one line naming the flag, the CLI's
message. The three automatic values (``sampler`` auto, ``batch_size`` 0,
``nthreads`` 0) are resolved by ``from_kwargs`` before the value exists, so a
:class:`Stage1Settings` always holds what the run uses; ``radius`` stays None
for "the default" (files and the printed argument dict record it so) and
:attr:`Stage1Settings.sampling_radius` is the radius in use.

TensorFlow-free, and light at import (converge and defense, used to validate,
are imported when a value is built).
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import common
from common import DEFAULT_RADIUS, DEFAULT_TARGET_TYPE, SAMPLE_NORMS, TargetKind, ToolError

DATASETS = ("digits", "mnist", "cifar", "imagenet")
SAMPLERS = ("tf", "shm")
PRECISIONS = ("float32", "tf32", "mixed_float16")
ORDERS = (1, 2)
#: Model batch size of the original tool per dataset.
DEFAULT_BATCH = {"imagenet": 32}
DEFAULT_BATCH_OTHER = 1024
#: converge.ConvergenceRule's defaults (kept equal by tests/test_settings.py; not imported
#: here so that this module stays free of SciPy at import).
_CONVERGE_DEFAULTS = {"min_iters": 100, "check_every": 25, "converge_noise": 2.0}
_DESCRIPTION = "Stage 1 of CLEVER: sample gradient norms around test images."


class SettingsError(ToolError):
    """A bad stage-1 setting: one line naming the flag (``--Nsamps must be positive, got -3``)."""


@dataclass(frozen=True, kw_only=True)
class Stage1Settings:
    """The settings of one stage-1 run; build with :meth:`from_kwargs` / :meth:`from_argv`.

    Field names are ``collect_gradients.py``'s long flag names, in its
    ``--help`` order (which is also the order of the printed argument dict and
    of a file's ``args`` record). Units: ``radius`` in input units (None: the
    original's default for ``sample_norm`` times the width of ``data_range``);
    ``data_range`` (lo, hi) of the model's inputs or None (unbounded).
    ``quiet``, ``no_progress`` and ``verbose`` only change what the CLI shows.
    """

    # data and model
    dataset: str
    model_name: str
    activation: str
    model_path: str | None
    models_dir: str
    data_dir: str
    weights: str
    labels_file: str | None
    input_size: int | None
    # images and targets
    numimg: int
    firstimg: int
    ids: str
    target_type: int
    targets: str | None
    fix_dirty_bug: bool
    # sampling (convergence flags first, as the CLI adds them)
    converge: float | None
    min_iters: int
    check_every: int
    converge_noise: float
    Nsamps: int
    Niters: int
    sample_norm: str
    radius: float | None
    data_range: tuple[float, float] | None
    uniform_ball: bool
    sampler: str
    nthreads: int
    transform: str
    order: int
    power_iters: int
    force_order2: bool
    compute_slope: bool
    batch_size: int
    seed: int
    precision: str
    jit_compile: bool
    # output
    save: str
    overwrite: bool
    quiet: bool
    no_progress: bool
    verbose: int

    def __post_init__(self):
        try:
            _validate(self)
        except SettingsError:
            raise
        except ToolError as err:  # common/converge/defense name the flag already
            raise SettingsError(str(err)) from None

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Stage1Settings":
        """The CLI's defaults updated with ``kwargs``, checked and resolved.

        Values may be Python values (``data_range=(0, 1)`` or None,
        ``targets="top2,least"`` or ``["top2", "least"]``, ``radius=0.5``,
        ``target_type=0x1f`` or ``"0x1f"``) or the CLI's strings. An unknown
        keyword or a bad value raises :class:`SettingsError` naming the flag.
        """
        unknown = [k for k in kwargs if k not in DEFAULTS]
        if unknown:
            raise SettingsError(f"--{unknown[0]}: not a setting of stage 1 (collect_gradients.py "
                                "flags by their long names)")
        values = {**DEFAULTS, **kwargs}
        out = {name: _coerce(name, values[name]) for name in DEFAULTS}
        # The automatic values, resolved before the value exists (never changed after).
        if out["sampler"] == "auto":
            out["sampler"] = "shm" if out["transform"] else "tf"
        if out["batch_size"] == 0:
            out["batch_size"] = DEFAULT_BATCH.get(out["dataset"], DEFAULT_BATCH_OTHER)
        if out["nthreads"] == 0:
            out["nthreads"] = max(1, min(4, (os.cpu_count() or 2) // 2))
        return cls(**out)

    @classmethod
    def from_argv(cls, argv: Sequence[str], *, prog: str = "collect_gradients.py",
                  description: str = _DESCRIPTION) -> "Stage1Settings":
        """``collect_gradients.py``'s command line: argparse errors (and ``--help``)
        exit as argparse does; a bad value raises :class:`SettingsError`."""
        ns = stage1_parser(prog=prog, description=description).parse_args(list(argv))
        return cls.from_kwargs(**vars(ns))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Stage1Settings":
        """The value back from :meth:`record` (e.g. after a JSON round trip)."""
        values = {k: v for k, v in record.items() if k in DEFAULTS}
        for k, v in values.items():
            if v == "" and (DEFAULTS[k] is None or k == "data_range"):
                values[k] = None
        return cls.from_kwargs(**values)

    def with_(self, **changes: Any) -> "Stage1Settings":
        """A copy with ``changes``, checked again (via :meth:`from_kwargs`).

        The automatic values are not re-derived: pass ``sampler="auto"``,
        ``batch_size=0`` or ``nthreads=0`` to have them chosen again.
        """
        return type(self).from_kwargs(**{**self.as_dict(), **changes})

    # -- views -----------------------------------------------------------------
    def as_dict(self) -> dict:
        """Field -> value, in flag order (what ``vars(args)`` of the CLI held)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def record(self) -> dict:
        """The settings as a JSON- and MATLAB-storable dict (None becomes ''; the
        data range a list) plus ``targets_resolved``: a file's ``args`` record."""
        out = {}
        for k, v in self.as_dict().items():
            if v is None:
                v = ""
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        out["targets_resolved"] = ",".join(k.name.lower() for k in self.kinds)
        return out

    @property
    def kinds(self) -> tuple[TargetKind, ...]:
        """The target kinds: ``targets`` when given, else the ``target_type`` mask."""
        return tuple(common.target_kinds_from_names(self.targets) if self.targets
                     else common.target_kinds_from_mask(self.target_type))

    @property
    def sampling_radius(self) -> float:
        """The radius in use: ``radius``, or the original's default for ``sample_norm``
        times the width of ``data_range``."""
        return (common.default_radius(self.sample_norm, self.data_range)
                if self.radius is None else float(self.radius))

    @property
    def model_label(self) -> str:
        """The model's name in file names and folders: ``model_path``'s stem, else
        ``model_name``."""
        if self.model_path:
            return os.path.splitext(os.path.basename(os.path.normpath(self.model_path)))[0]
        return self.model_name

    def out_dir(self, model_label: str | None = None) -> str:
        """``<save>/<dataset>_<model>``: the folder the CLI writes into."""
        return common.output_dir(self.save, self.dataset, model_label or self.model_label)


# --------------------------------------------------------------------------
# The one validation (on resolved values)
# --------------------------------------------------------------------------
def _validate(s: Stage1Settings) -> None:
    """Checks that need no data or model, so bad settings fail in a second."""
    check = common.check_positive
    check("--Nsamps", s.Nsamps)
    check("--Niters", s.Niters)
    check("--numimg", s.numimg)
    check("--firstimg", s.firstimg, allow_zero=True)
    check("--batch_size", s.batch_size, allow_zero=True)
    check("--nthreads", s.nthreads, allow_zero=True)
    if s.batch_size == 0 or s.nthreads == 0 or s.sampler not in SAMPLERS:
        raise ValueError("Stage1Settings: build with from_kwargs, which resolves sampler 'auto', "
                         "batch_size 0 and nthreads 0")
    if s.radius is not None:
        check("--radius", s.radius)
    if s.data_range is None:
        if s.radius is None:
            common.default_radius(s.sample_norm, None)  # the one-line error asking for it
        if s.transform:
            raise SettingsError("--transform: the transformations work on images of a bounded "
                                "range; not with --data_range none")
    if s.compute_slope and s.Nsamps < 2:
        raise SettingsError("--compute_slope needs --Nsamps of at least 2 (pairs of samples)")
    check("--power_iters", s.power_iters)
    import converge

    converge.rule_from_settings(s)  # a bad --converge/--min_iters/--check_every fails here
    if s.order == 2 and s.compute_slope:
        raise SettingsError("--compute_slope applies to --order 1 only")
    _ = s.kinds  # a bad --targets / --target_type fails here
    if s.transform and s.sampler == "tf":
        raise SettingsError("--transform runs in the sampling workers: use --sampler shm")
    if s.transform:
        import defense

        defense.get_transform(s.transform)  # a clear error listing the valid names
    if s.model_path and not os.path.exists(s.model_path):
        raise SettingsError(f"--model_path: {s.model_path} does not exist")


# --------------------------------------------------------------------------
# Types of the keyword values
# --------------------------------------------------------------------------
_INT = ("numimg", "firstimg", "min_iters", "check_every", "Nsamps", "Niters", "nthreads",
        "order", "power_iters", "batch_size", "seed", "verbose")
_OPT_INT = ("input_size",)
_FLOAT = ("converge_noise",)
_OPT_FLOAT = ("converge", "radius")
_BOOL = ("fix_dirty_bug", "uniform_ball", "force_order2", "compute_slope", "jit_compile",
         "overwrite", "quiet", "no_progress")
_OPT_STR = ("model_path", "labels_file", "targets")
_CHOICES = {"dataset": DATASETS, "sample_norm": tuple(SAMPLE_NORMS),
            "sampler": SAMPLERS + ("auto",), "precision": PRECISIONS, "order": ORDERS}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _coerce(name: str, value):
    """``value`` of setting ``name`` as the field's type; SettingsError names the flag."""
    flag = "--" + name

    def bad(kind):
        return SettingsError(f"{flag}: invalid {kind} value: {value!r}")

    if name == "data_range":
        try:
            return common.parse_data_range(value)
        except SettingsError:
            raise
        except ToolError as err:
            raise SettingsError(str(err)) from None
    if name == "target_type":
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                raise bad("int") from None
        if not _is_int(value):
            raise bad("int")
        return int(value)
    if name == "targets" and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if value is None and (name in _OPT_INT or name in _OPT_FLOAT or name in _OPT_STR):
        return None
    if name in _INT or name in _OPT_INT:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad("int") from None
        elif not _is_int(value):
            raise bad("int")
        value = int(value)
    elif name in _FLOAT or name in _OPT_FLOAT:
        if isinstance(value, bool):
            raise bad("float")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad("float") from None
    elif name in _BOOL:
        if not isinstance(value, bool) and not (type(value).__module__ == "numpy"
                                                and getattr(value, "dtype", None) == bool):
            raise SettingsError(f"{flag}: expected true or false, got {value!r}")
        value = bool(value)
    elif not isinstance(value, str):
        raise SettingsError(f"{flag}: expected a string, got {value!r}")
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise SettingsError(f"{flag}: invalid choice: {value!r} (choose from {shown})")
    return value


# --------------------------------------------------------------------------
# The command line (collect_gradients.py's flags; sweep.py's shared flags)
# --------------------------------------------------------------------------
class _RaisingParser(argparse.ArgumentParser):
    """argparse whose errors raise SettingsError (the message only) instead of exiting."""

    def error(self, message):
        raise SettingsError(message)


def stage1_parser(prog: str = "collect_gradients.py", description: str = _DESCRIPTION, *,
                  given_only: bool = False) -> argparse.ArgumentParser:
    """The parser of ``collect_gradients.py``'s flags.

    ``given_only``: no defaults (a flag not on the line is absent from the
    result), no ``--help``, and errors raise :class:`SettingsError`: the
    shared flags of a sweep, merged with each job's own.
    """
    if given_only:
        p = _RaisingParser(prog=prog, add_help=False, argument_default=argparse.SUPPRESS)
    else:
        p = argparse.ArgumentParser(prog=prog, description=description,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(group, *names, **kw):
        if given_only:
            kw["default"] = argparse.SUPPRESS
        group.add_argument(*names, **kw)

    g = p.add_argument_group("data and model")
    add(g, "-d", "--dataset", choices=DATASETS, default="digits",
        help="dataset; digits is scikit-learn's bundled set and works offline")
    add(g, "-m", "--model_name", default="normal",
        help="model: normal, distilled, brelu, 2-layer, a file stem under "
             "--models_dir, or an ImageNet zoo name")
    add(g, "--activation", default="relu", help="activation of the 'normal' model")
    add(g, "--model_path", default=None,
        help="your own Keras model (.keras, .h5 or SavedModel folder) that outputs "
             "logits; the output folder is then named after the file's stem")
    add(g, "--models_dir", default="models", help="folder of the trained models")
    add(g, "--data_dir", default="data", help="folder of the dataset files")
    add(g, "--weights", default="imagenet",
        help="ImageNet weights: imagenet (Keras cache), random, a weights file, or "
             "an original frozen graph (.pb)")
    add(g, "--labels_file", default=None,
        help="ImageNet: a file of 'filename label' lines (labels from 0) instead of "
             "labels in the image names ('<label>.<anything>.jpg', from 1)")
    add(g, "--input_size", type=int, default=None,
        help="ImageNet: build the zoo model for this image size instead of its own")
    g = p.add_argument_group("images and targets")
    add(g, "-n", "--numimg", type=int, default=1, help="number of images to examine")
    add(g, "-f", "--firstimg", type=int, default=0, help="index of the first image")
    add(g, "--ids", default="",
        help="file of image ids: the original's tab-separated file with a header "
             "row (columns id and, for user targets, target), or a CSV of "
             "id[,target,...] rows; --firstimg/--numimg then slice this list")
    add(g, "--target_type", type=lambda s: int(s, 0), default=DEFAULT_TARGET_TYPE,
        help="bit mask of the original tool: 1 top2, 2 random, 4 least, "
             "8 user (--ids), 16 all classes (untargeted)")
    add(g, "--targets", default=None,
        help="readable form of --target_type: comma list of top2,random,least,"
             "user,all (overrides --target_type)")
    add(g, "--fix_dirty_bug", action="store_true",
        help="accepted for the original's command lines; does nothing (the original "
             "marked it unsupported)")
    g = p.add_argument_group("sampling")
    d = _CONVERGE_DEFAULTS
    add(g, "--converge", type=float, default=None, metavar="TOL",
        help="stop an image early once every Lipschitz estimate (stage 2's fit, "
             "every target and norm) moved between checks by less than TOL "
             "(relative, e.g. 0.01) or less than its own sampling noise (see "
             "--converge_noise), and its K-S p-value is above "
             "0.05; default: off, all --Niters batches (the original)")
    add(g, "--min_iters", type=int, default=d["min_iters"],
        help="--converge: batches before the first check")
    add(g, "--check_every", type=int, default=d["check_every"],
        help="--converge: batches between checks")
    add(g, "--converge_noise", type=float, default=d["converge_noise"], metavar="F",
        help="--converge: a move smaller than F times the estimate's sampling "
             "noise (fits of the even and of the odd batches) also counts as "
             "converged; 0: only TOL (default %(default)s)")
    add(g, "-N", "--Nsamps", type=int, default=1024, help="samples per batch (N_s)")
    add(g, "-i", "--Niters", type=int, default=500, help="number of batches (N_b)")
    add(g, "--sample_norm", choices=tuple(SAMPLE_NORMS), default="l2",
        help="norm of the sampling ball")
    add(g, "--radius", type=float, default=None,
        help="sampling radius R (default: the original's "
             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RADIUS.items())
             + ", times the width of --data_range)")
    add(g, "--data_range", nargs="+", metavar="LO HI",
        default=[f"{v:g}" for v in common.DEFAULT_DATA_RANGE],
        help="the model's input range: the images are scaled into it and every "
             "sampled point is clipped to it; none: unbounded inputs, no clipping "
             "(needs --radius)")
    add(g, "--uniform_ball", action="store_true",
        help="sample uniformly in the ball of radius R (the paper) instead of the "
             "original tool's direction-times-uniform-scale scheme")
    add(g, "--sampler", choices=SAMPLERS + ("auto",), default="auto",
        help="draw samples in the TensorFlow graph (tf) or in shared-memory worker "
             "processes (shm); auto is tf, or shm with --transform")
    add(g, "--nthreads", type=int, default=0,
        help="sampling worker processes for --sampler shm (0: automatic)")
    add(g, "--transform", default="",
        help="input transformation evaluated with BPDA: defend_reduce, defend_jpeg, "
             "defend_png, defend_none")
    add(g, "--order", type=int, choices=ORDERS, default=1,
        help="1: gradient norms; 2: second-order CLEVER (curvature)")
    add(g, "--power_iters", type=int, default=500,
        help="maximum power-iteration steps; stops when the estimate changes by less "
             "than 1e-3 (--order 2)")
    add(g, "--force_order2", action="store_true",
        help="run --order 2 on a model with ReLU-like activations, whose Hessian "
             "is zero almost everywhere")
    add(g, "--compute_slope", action="store_true",
        help="also store SLOPE estimates (L1_max, L2_max, Li_max)")
    add(g, "-b", "--batch_size", type=int, default=0,
        help="model batch size (0: 1024, or 32 for imagenet)")
    add(g, "--seed", type=int, default=1215, help="random seed")
    add(g, "--precision", choices=PRECISIONS, default="float32",
        help="arithmetic of the model's gradients: float32 (TensorFloat-32 off), tf32 "
             "or mixed_float16 (faster on GPUs, less exact)")
    add(g, "--jit_compile", action="store_true",
        help="compile the gradient computation with XLA")
    g = p.add_argument_group("output")
    add(g, "-s", "--save", default="./lipschitz_mat", help="results folder")
    add(g, "--overwrite", action="store_true", help="recompute existing result files")
    add(g, "-q", "--quiet", action="store_true",
        help="omit the per-iteration [STATS][L2] lines")
    add(g, "--no_progress", action="store_true", help="no progress bar")
    add(g, "-v", "--verbose", action="count", default=0)
    return p


def given_flags(argv: Sequence[str]) -> dict:
    """The stage-1 flags on ``argv`` that were given, as keywords of :meth:`from_kwargs`
    (argparse's types applied). Errors raise :class:`SettingsError` (argparse's message)."""
    return vars(stage1_parser(given_only=True).parse_args(list(argv)))


def _defaults() -> dict:
    p = stage1_parser()
    return {a.dest: a.default for a in p._actions if a.dest != "help"}


#: The CLI's defaults, by field (``sampler`` auto, ``batch_size`` and ``nthreads`` 0:
#: resolved by :meth:`Stage1Settings.from_kwargs`).
DEFAULTS: dict[str, Any] = _defaults()
assert list(DEFAULTS) == [f.name for f in dataclasses.fields(Stage1Settings)], \
    "settings.py: the parser's flags and Stage1Settings' fields must agree, in order"
