"""CLEVER from Python: scores of an in-memory model in one call, files only when asked.

:func:`clever_t` (one target), :func:`clever_u` (every class, the minimum)
and :func:`clever_batch` (many images and target kinds) run stage 1 with
``stage1_run.collect`` and stage 2 with ``stage2.score_files``: the same
functions as ``collect_gradients.py`` and ``clever.py``, so for the same image,
target, settings and seed the arrays equal the CLI's files bit for bit and the
bounds equal the printed ones. :func:`score_maxima` and :func:`score_arrays`
are stage 2 alone, on a record or on arrays of batch maxima, without files.
``clever.py`` re-exports these names (``clever.clever_t`` ...).

Importing this module imports neither TensorFlow nor Keras; stage 1 imports
them when it runs. Keyword settings are ``collect_gradients.py``'s long flag
names (``Nsamps``, ``Niters``, ``sample_norm``, ``radius``, ``seed``,
``batch_size``, ``sampler``, ``order``, ``transform``, ``converge``,
``data_range``, ...) with its defaults, plus stage 2's (``method``,
``shape_reg``, ``penalize``, ``use_slope``, ``no_radius_cap``,
``num_samples``); a bad value raises :class:`settings.SettingsError` with the
CLI's message.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

import common
import interval
import stage2
from common import ToolError
from settings import SettingsError, Stage1Settings
from stage2_files import stage1_file_from_mapping
from weibull_fit import FitResult, Method, Penalty

__all__ = ["NormResult", "CleverResult", "clever_t", "clever_u", "clever_batch",
           "score_maxima", "score_arrays", "SettingsError"]

#: Stage-2 keywords (clever.py's flags) and their defaults.
STAGE2_DEFAULTS: dict[str, Any] = {"method": "mle_reg", "shape_reg": 0.01, "penalize": "scale",
                                   "use_slope": False, "no_radius_cap": False,
                                   "num_samples": 0, "interval": interval.DEFAULT_LEVEL}


@dataclass(frozen=True)
class NormResult:
    """The CLEVER score of one image (and target) in one bound norm p.

    ``bound``: the reported score (capped at the sampling radius in the norm p,
    unless ``no_radius_cap``), in input units; ``bound_uncapped``: the original
    tool's g(x0)/L; ``lipschitz``: the fitted location L, the local Lipschitz
    constant in the dual norm q (order 2: the curvature); ``fit``: the reverse
    Weibull fit (shape, loc, scale, ks, pval, status). ``target``: the target
    class (for :func:`clever_u` the class of the minimum in this norm);
    ``g_x0``: f_c(x0) - f_target(x0). ``bound_lo``, ``bound_hi``: the
    ``interval`` keyword's interval of ``bound`` (default 90%: where a rerun
    with another seed would put it, docs/intervals.md; NaN with ``interval=0``
    or when no interval can be estimated); ``lipschitz_lo``, ``lipschitz_hi``:
    that of ``lipschitz``.
    """

    norm: str
    bound: float
    bound_uncapped: float
    lipschitz: float
    fit: FitResult
    target: int
    g_x0: float
    bound_lo: float = math.nan
    bound_hi: float = math.nan
    lipschitz_lo: float = math.nan
    lipschitz_hi: float = math.nan

    @property
    def shape(self) -> float:
        return self.fit.shape

    @property
    def loc(self) -> float:
        return self.fit.loc

    @property
    def scale(self) -> float:
        return self.fit.scale

    @property
    def ks(self) -> float:
        return self.fit.ks

    @property
    def pvalue(self) -> float:
        return self.fit.pval

    @property
    def status(self) -> str:
        return self.fit.status.value


@dataclass(frozen=True)
class CleverResult:
    """The scores of one image: targeted (one target) or untargeted (minimum over classes).

    ``norms``: {"L1", "L2", "Li"} -> :class:`NormResult` (order 2: "L2" only).
    ``info``: ``top2``, ``random``, ``least``, ``user`` or ``untargeted``;
    ``target``: the target class (None for untargeted: see each norm's
    ``target``). ``files``: the stage-1 results (``stage1_run.FileResult``,
    whose ``record`` holds the ``.mat`` keys; ``path`` set when ``save`` was
    given). ``settings``: the stage-1 settings record; ``stage2``: the fit
    settings; ``provenance``: versions and the run's recorded settings.
    """

    image: int
    true_label: int
    predicted: int
    info: str
    target: int | None
    norms: Mapping[str, NormResult]
    files: tuple = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    stage2: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def bound(self, norm: str = "L2") -> float:
        """The reported score in ``norm`` (``L1``, ``L2`` or ``Li``)."""
        return self.norms[norm].bound

    @property
    def bounds(self) -> dict[str, float]:
        """{norm: reported score}."""
        return {k: v.bound for k, v in self.norms.items()}

    @property
    def g_x0(self) -> float:
        """g(x0) of the target (untargeted: of the L2 minimum's class)."""
        norm = "L2" if "L2" in self.norms else next(iter(self.norms))
        return self.norms[norm].g_x0


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------
def _split(kwargs: Mapping[str, Any]) -> tuple[dict, stage2.Options, dict]:
    """Stage-1 keywords, stage 2's Options and its record, checked as the CLIs check them."""
    s2 = {k: kwargs[k] for k in STAGE2_DEFAULTS if k in kwargs}
    s1 = {k: v for k, v in kwargs.items() if k not in STAGE2_DEFAULTS}
    values = {**STAGE2_DEFAULTS, **s2}
    try:
        method = Method(values["method"])
    except ValueError:
        raise SettingsError(_choice_error("--method", values["method"], Method)) from None
    try:
        penalize = Penalty(values["penalize"])
    except ValueError:
        raise SettingsError(_choice_error("--penalize", values["penalize"], Penalty)) from None
    for name in ("shape_reg", "num_samples"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise SettingsError(f"--{name}: invalid value: {value!r}")
        if name == "num_samples" and int(value) != value:
            raise SettingsError(f"--num_samples: invalid int value: {value!r}")
        try:
            common.check_positive(f"--{name}", value, allow_zero=True)
        except ToolError as err:
            raise SettingsError(str(err)) from None
    for name in ("use_slope", "no_radius_cap"):
        if not isinstance(values[name], (bool, np.bool_)):
            raise SettingsError(f"--{name}: expected true or false, got {values[name]!r}")
    level = values["interval"]
    try:
        if isinstance(level, bool) or not isinstance(level, (int, float, np.number)):
            raise ValueError(f"not a number: {level!r}")
        level = interval.check_level(level)
    except ValueError as err:
        raise SettingsError(f"--interval: {err}") from None
    options = stage2.Options(method=method, shape_reg=float(values["shape_reg"]),
                             penalize=penalize, num_samples=int(values["num_samples"]),
                             use_slope=bool(values["use_slope"]),
                             radius_cap=not values["no_radius_cap"], nthreads=1,
                             interval=level)
    return s1, options, {k: (v.value if hasattr(v, "value") else v) for k, v in values.items()}


def _choice_error(flag: str, value, enum_type) -> str:
    shown = ", ".join(repr(m.value) for m in enum_type)
    return f"{flag}: invalid choice: {value!r} (choose from {shown})"


def _settings(model, targets, s1: dict) -> tuple[Stage1Settings, object]:
    """(settings, in-memory model or None): a path ``model`` becomes ``model_path``."""
    for key in ("targets", "target_type", "model_path"):
        if key in s1:
            raise SettingsError(f"--{key}: given by the call itself (model and target "
                                "arguments), not as a keyword")
    if isinstance(model, (str, os.PathLike)):
        return Stage1Settings.from_kwargs(targets=targets, model_path=os.fspath(model),
                                          **s1), None
    if model is None:
        raise SettingsError("model: give a Keras model or a model file")
    return Stage1Settings.from_kwargs(targets=targets, **s1), model


def _as_batch(x, model) -> tuple[np.ndarray, bool]:
    """``x`` as float32 [n, H, W, C] and whether it was one image."""
    x = np.asarray(x, np.float32)
    rank = None
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, tuple) and shape:
        rank = len(shape)
    if rank is not None and x.ndim == rank - 1:
        return x[None], True
    if rank is None and x.ndim == 3:
        return x[None], True
    if x.ndim != 4:
        raise ToolError(f"x: expected one image [H, W, C] or a batch [n, H, W, C], "
                        f"got shape {x.shape}")
    return x, False


# --------------------------------------------------------------------------
# Stage 2 on records and arrays
# --------------------------------------------------------------------------
def _files(results) -> list:
    """stage2_files.StageOneFile of each stage-1 result, as the CLI would read its file."""
    out = []
    for r in results:
        name = r.path or str(r.record.get("path", ""))
        out.append(stage1_file_from_mapping(r.record, name))
    return out


def _norm_results(fs: stage2.FileScore, options: stage2.Options) -> dict[str, NormResult]:
    out = {}
    for n, s in fs.scores.items():
        lo, hi = stage2.reported_interval(s, options.radius_cap)
        iv = s.interval
        out[n.label] = NormResult(n.label, stage2.reported_bound(s, options.radius_cap),
                                  s.bound_uncapped, s.fit.estimate, s.fit,
                                  int(fs.file.target_label), float(fs.file.g_x0), lo, hi,
                                  iv.lo if iv is not None else math.nan,
                                  iv.hi if iv is not None else math.nan)
    return out


def _scored(files: list, options: stage2.Options) -> stage2.RunResult:
    result = stage2.score_files(files, options)
    if result.errors:
        path, message = result.errors[0]
        raise ToolError(f"{path}: {message}")
    return result


def score_maxima(record: Mapping[str, Any], **fit_settings) -> dict[str, NormResult]:
    """Stage 2 of one stage-1 record without a file: {norm: :class:`NormResult`}.

    ``record``: the keys of a stage-1 ``.mat`` file (``FileResult.record``, or
    ``scipy.io.loadmat(path, simplify_cells=True)``); ``fit_settings``: the
    stage-2 keywords (``method``, ``shape_reg``, ``penalize``, ``use_slope``,
    ``no_radius_cap``, ``num_samples``).
    """
    unknown = [k for k in fit_settings if k not in STAGE2_DEFAULTS]
    if unknown:
        raise SettingsError(f"--{unknown[0]}: not a stage-2 setting "
                            f"({', '.join(STAGE2_DEFAULTS)})")
    _, options, _ = _split(fit_settings)
    name = str(record.get("path", "")) or "record"
    file = stage1_file_from_mapping(record, name, use_slope=options.use_slope,
                                    num_samples=options.num_samples)
    result = _scored([file], options)
    return _norm_results(result.files[0], options)


def score_arrays(grad_max, g_x0: float, *, radius: float, sample_norm: str = "l2",
                 dim: int | None = None, order: int = 1, grad_x0_norm: float | None = None,
                 **fit_settings) -> dict[str, NormResult]:
    """Stage 2 from arrays of batch maxima: {norm: :class:`NormResult`}.

    ``grad_max``: order 1, float [N_b, 3] of the batch maxima of the gradient's
    L1, L2 and L-inf norms (the ``G1_max``, ``G2_max``, ``Gi_max`` columns; the
    L-inf bound uses the L1 column, the L1 bound the L-inf column); order 2,
    float [N_b] of the curvature maxima, with ``grad_x0_norm`` = ||grad
    g(x0)||_2. ``g_x0``: f_c(x0) - f_j(x0); ``radius``, ``sample_norm``
    (``l1``, ``l2``, ``li``), ``dim`` (input size; None: the bounds are not
    capped): the ball the points came from.
    """
    g = np.asarray(grad_max)
    record: dict[str, Any] = {"g_x0": float(g_x0), "id": 0, "true_label": 0,
                              "target_label": 0, "info": "arrays", "radius": float(radius),
                              "sample_norm": sample_norm}
    if dim is not None:
        record["dim"] = int(dim)
    if order == 1:
        if g.ndim != 2 or g.shape[1] != 3:
            raise ToolError(f"grad_max: expected [N_b, 3] (L1, L2, L-inf), got shape {g.shape}")
        record.update(G1_max=g[:, 0], G2_max=g[:, 1], Gi_max=g[:, 2])
    elif order == 2:
        if grad_x0_norm is None:
            raise ToolError("grad_x0_norm: order 2 needs ||grad g(x0)||_2")
        record.update(H2_max=g.ravel(), g_x0_grad_2_norm=float(grad_x0_norm))
    else:
        raise ToolError(f"order: 1 or 2, got {order}")
    return score_maxima(record, **fit_settings)


# --------------------------------------------------------------------------
# Stage 1 + 2
# --------------------------------------------------------------------------
def _run(model, x, targets: str, kwargs: Mapping[str, Any], *, labels=None,
         user_targets=None, untargeted: bool = False, ids=None) -> list[CleverResult]:
    """Both stages on ``x``; one result per (image, target), or per image untargeted."""
    import stage1_run

    kwargs = dict(kwargs)
    save = kwargs.pop("save", None)
    s1, options, s2_record = _split(kwargs)
    settings, in_memory = _settings(model, targets, s1)
    images, _ = _as_batch(x, in_memory)
    out_dir = None
    if save:
        out_dir = settings.with_(save=os.fspath(save)).out_dir(
            "model" if in_memory is not None else None)
    results = stage1_run.collect(settings, model=in_memory, images=images, labels=labels,
                                 user_targets=user_targets, out_dir=out_dir)
    if not results:
        return []
    files = _files(results)
    record = settings.record()
    provenance = {"versions": common.versions(), "model": settings.model_label
                  if in_memory is None else getattr(in_memory, "name", "model")}
    by_key = {(r.image_id, r.info, r.target_label): r for r in results}
    if untargeted:
        result = _scored(files, stage2.Options(**{**_options_dict(options), "untargeted": True}))
        out = []
        for image, scored in _group_by_image(result.files).items():
            first = _first_result(scored, by_key)
            norms = {}
            for norm in scored[0].scores:
                # The class of the minimum; a tie keeps the first file, as min() does.
                best = min(scored, key=lambda fs: stage2.reported_bound(fs.scores[norm],
                                                                        options.radius_cap))
                norms[norm.label] = _norm_results(best, options)[norm.label]
            out.append(CleverResult(image, first.true_label, first.pred_label, "untargeted",
                                    None, norms,
                                    tuple(by_key[(fs.file.img_id, fs.file.info,
                                                  fs.file.target_label)] for fs in scored),
                                    record, s2_record, provenance))
        return out
    result = _scored(files, options)
    out = []
    for fs in result.files:
        r = by_key[(fs.file.img_id, fs.file.info, fs.file.target_label)]
        out.append(CleverResult(r.image_id, r.true_label, r.pred_label, r.info, r.target_label,
                                _norm_results(fs, options), (r,), record, s2_record,
                                provenance))
    return out


def _options_dict(options: stage2.Options) -> dict:
    return {f: getattr(options, f) for f in options.__dataclass_fields__}


def _group_by_image(files: Sequence[stage2.FileScore]) -> dict[int, list]:
    out: dict[int, list] = {}
    for fs in files:
        out.setdefault(int(fs.file.img_id), []).append(fs)
    return out


def _first_result(scored: Sequence[stage2.FileScore], by_key: Mapping) -> Any:
    """The stage-1 result of an image's first scored file."""
    fs = scored[0]
    return by_key[(fs.file.img_id, fs.file.info, fs.file.target_label)]


def clever_t(model, x, target, *, label: int | None = None, **settings):
    """CLEVER-t of one image (or a batch) and one target: :class:`CleverResult` (or a list).

    Args:
        model: a Keras model with logits (a final softmax is removed, as the
            CLI does), or a model file as ``--model_path`` takes it.
        x: float32 [H, W, C] or [n, H, W, C], in the model's own input range
            (``data_range``, default -0.5 0.5).
        target: a class index, or ``"top2"``, ``"random"``, ``"least"``.
        label: the true class (None: the predicted class); an image the
            model misclassifies has no score (``ToolError``), as in the CLI.
        settings: stage-1 and stage-2 keywords (module docstring); ``save``:
            a folder to write the usual ``.mat`` files under (nothing by default).
    """
    images, single = _as_batch(x, None if isinstance(model, (str, os.PathLike)) else model)
    labels = None if label is None else np.full(len(images), int(label))
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        kinds, user = "user", {i: [int(target)] for i in range(len(images))}
    elif isinstance(target, str) and target in ("top2", "random", "least"):
        kinds, user = target, None
    else:
        raise SettingsError(f"target: a class index or one of top2, random, least; "
                            f"got {target!r}")
    out = _run(model, images, kinds, settings, labels=labels, user_targets=user)
    _check_scored(out, len(images), "clever_t")
    return out[0] if single else out


def clever_u(model, x, *, label: int | None = None, **settings):
    """CLEVER-u of one image (or a batch): the minimum over every other class, per norm.

    Same arguments as :func:`clever_t` without ``target``. Each norm's
    :class:`NormResult` names the class of its minimum.
    """
    images, single = _as_batch(x, None if isinstance(model, (str, os.PathLike)) else model)
    labels = None if label is None else np.full(len(images), int(label))
    out = _run(model, images, "all", settings, labels=labels, untargeted=True)
    _check_scored(out, len(images), "clever_u")
    return out[0] if single else out


def clever_batch(model, x, targets: Sequence[str] | str = ("top2", "random", "least"), *,
                 labels=None, untargeted: bool = False, **settings) -> list[CleverResult]:
    """CLEVER scores of many images and target kinds in one stage-1 run.

    ``x``: [n, H, W, C]; ``targets``: kinds (``top2``, ``random``, ``least``,
    as ``--targets``); ``untargeted``: also CLEVER-u of each image (one run
    over every class). ``labels``: int [n] true classes (None: predicted);
    misclassified images are left out, as in the CLI. Returns the targeted
    results in image order (then ``least``, ``random``, ``top2`` per image, the
    CLI's file order), followed by the untargeted ones.
    """
    model_arg = None if isinstance(model, (str, os.PathLike)) else model
    images, _ = _as_batch(x, model_arg)
    kinds = ",".join([targets] if isinstance(targets, str) else list(targets))
    out = _run(model, images, kinds, settings, labels=labels) if kinds else []
    if untargeted:
        out += _run(model, images, "all", settings, labels=labels, untargeted=True)
    return out


def _check_scored(out: list, n: int, what: str) -> None:
    if len(out) < n:
        done = {r.image for r in out}
        missing = [i for i in range(n) if i not in done]
        raise ToolError(f"{what}: image {missing[0]} has no score (misclassified: its label "
                        "is not the predicted class)")

