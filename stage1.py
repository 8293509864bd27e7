"""The per-image work of stage 1, shared by stage1_run.py and the sweep.

One core, two drivers: :func:`score_image` runs the iterations of one image
for all its pending targets and returns the per-target arrays;
:func:`mat_record` turns one (image, target) result into every key of its
``.mat`` file (docs/format.md plus this toolkit's provenance keys);
:func:`plan_image_files` lists the files still to write; :func:`image_ids`,
:func:`estimator_options` and :func:`run_settings` are the run's other
pieces both drivers need. Every function takes the run's
``settings.Stage1Settings``; the drivers keep printing and writing files.

TensorFlow-free at import: the estimator is passed in, and
``estimate_gradient_norm`` is imported only when an image is scored.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

import common
from common import MatName, ToolError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from estimate_gradient_norm import IterationStats, TargetResult
    from utils import ImageTask, Target

log = logging.getLogger("clever.stage1")

#: stop_rule(iterations_done, grad_so_far [it, T, 3 or 1]) -> (stop, check_record or None)
StopRule = Callable[[int, np.ndarray], "tuple[bool, dict | None]"]


@dataclass
class ImageResult:
    """Stage-1 output of one image: one :class:`TargetResult` per scored target.

    ``results[k].grad_max``: [niters_used, 3] (order 2: [niters_used, 1]);
    ``slope_max``: [niters_used, 3]; ``g_x0`` = f_c - f_j at the defended
    point T(x0) (x0 without a transformation); ``seconds``: wall time of the
    image. ``niters_used``: iterations run (fewer than asked when a stop rule
    stopped early). ``checks``: the stop rule's records, in order.
    ``grad_x0_norms``: [T, 3] gradient L1, L2, L-inf norms of g_j at the
    defended point (order 2 only, else None).
    """

    results: list
    niters_used: int
    checks: list = field(default_factory=list)
    grad_x0_norms: np.ndarray | None = None


def score_image(estimator, sampler, pool, task: "ImageTask", targets: Sequence["Target"],
                x_model: np.ndarray, *, nsamps: int, niters: int, seed: int, order: int,
                on_iteration: Callable[["IterationStats"], None] | None = None,
                stop_rule: StopRule | None = None,
                check_every: int | None = None) -> ImageResult:
    """Run the iterations of one image for ``targets`` and collect the per-target maxima.

    Args:
        estimator: an ``estimate_gradient_norm.GradientNormEstimator``.
        sampler: the ``randsphere.BallSampler`` of the run.
        pool: a ``randsphere.SamplerPool`` (points and transformation drawn
            in worker processes) or None (points drawn in the graph).
        task: the image (``utils.ImageTask``): its predicted class and the
            logits at the defended point give g(x0).
        targets: the targets to score (``utils.Target``), in file order.
        x_model: float32 [*input_shape], the point the samples are drawn
            around: the UNtransformed x0 (BPDA as the original: the model
            sees T(clip(x0 + delta))).
        nsamps, niters, seed: N_s, N_b (the maximum with a stop rule), --seed.
        order: 1 (gradient norms) or 2 (curvature).
        on_iteration: called with each ``IterationStats`` (printing, progress).
        stop_rule: ``stop_rule(iterations_done, grad_so_far)`` with
            grad_so_far float64 [iterations_done, T, 3] (order 2: [.., T, 1]),
            called after every ``check_every`` iterations; returns
            (stop, check_record or None). Stopping early keeps only the
            iterations run.
        check_every: iterations between stop-rule calls (needed with a rule).

    Returns:
        :class:`ImageResult` (pure: nothing printed, nothing written).
    """
    from estimate_gradient_norm import TargetResult

    if stop_rule is not None and not (check_every and check_every > 0):
        raise ValueError("score_image: a stop_rule needs a positive check_every")
    labels = [int(t.label) for t in targets]
    n_t = len(labels)
    width = 3 if order == 1 else 1
    grad = np.full((niters, n_t, width), np.nan)
    slope = np.zeros((niters, n_t, 3))
    nan_s = np.zeros(n_t, np.int64)
    zero_s = np.zeros(n_t, np.int64)
    nan_b = np.zeros(n_t, np.int64)
    zero_b = np.zeros(n_t, np.int64)
    capped = np.zeros(n_t, np.int64)
    checks: list[dict] = []
    done = 0
    t_img = time.time()
    # Chunks end where the rule checks, so stopping wastes no computed iteration.
    gen = estimator.iterate(x_model, task.predicted, labels, nsamps, niters, seed, task.img_id,
                            sampler, pool, sync_every=check_every if stop_rule else None)
    try:
        for st in gen:
            grad[st.iteration] = st.grad_max
            if st.slope_max is not None:
                slope[st.iteration] = st.slope_max
            nan_s += st.nan
            zero_s += st.zero
            nan_b += st.nan > 0
            zero_b += st.zero >= nsamps
            if order == 2 and st.power_steps is not None:
                capped += np.asarray(st.power_steps) >= estimator.power_iters
            done = st.iteration + 1
            if on_iteration is not None:
                on_iteration(st)
            if stop_rule is not None and done % check_every == 0:
                stop, record = stop_rule(done, grad[:done])
                if record is not None:
                    checks.append(record)
                if stop:
                    break
    finally:
        gen.close()  # an early stop: the pool's stream is closed, no work left queued
    seconds = time.time() - t_img
    grad_x0 = None
    if order == 2:
        # The gradient at the defended point, where g(x0) is taken (identity backward pass).
        grad_x0 = estimator.gradient_norms_at(task.model_point, task.predicted, labels)
    results = []
    for k, label in enumerate(labels):
        results.append(TargetResult(
            label, float(task.logits[task.predicted] - task.logits[label]),
            grad[:done, k], slope[:done, k], int(nan_b[k]), int(zero_b[k]), int(nan_s[k]),
            int(zero_s[k]), seconds, int(capped[k])))
    return ImageResult(results, done, checks, grad_x0)


def defended_points(transform: str, images: np.ndarray, ids: Sequence[int], seed: int,
                    data_range: tuple[float, float] | None = common.DEFAULT_DATA_RANGE
                    ) -> np.ndarray:
    """T(x0) of each image: float32 [n, *input_shape], the defended classifier's inputs.

    ``images[k]`` is test image ``ids[k]``. A random transformation
    (defend_tv) draws each image's mask from its own stream (seed, image id),
    so T(x0) does not depend on which other images are in the run, nor on
    which driver (collect_gradients.py or a sweep worker) computes it.
    ``data_range``: the images' range (lo, hi), mapped to T's [0, 1] and back.
    """
    import defense
    from randsphere import transform_rng

    if not len(ids):
        return images
    return np.concatenate([
        defense.apply_transform(transform, images[k:k + 1],
                                rng=transform_rng((seed, int(img_id), -1, 0)),
                                data_range=data_range)
        for k, img_id in enumerate(ids)])


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------
def run_args(settings) -> dict:
    """The run's settings as a MATLAB-storable dict (None becomes ''): a file's ``args``
    (``settings.Stage1Settings.record``)."""
    return settings.record()


def mat_record(settings, task: "ImageTask", target: "Target", result: "TargetResult", path: str,
               *, model_name: str, dim: int, radius: float, versions: dict,
               grad_x0_norm: np.ndarray | None = None, extra: dict | None = None) -> dict:
    """Every key of the ``.mat`` file of one (image, target).

    ``settings``: the run's ``settings.Stage1Settings``. docs/format.md's keys
    (first order: G1_max, G2_max, Gi_max, L1_max, L2_max, Li_max; second order:
    H2_max, g_x0_grad_2_norm; both: g_x0, pred, id, true_label, target_label,
    info, args, path) and this toolkit's provenance keys (radius, data range,
    sampling, seed, counts of NaN/zero gradients, precision, versions,
    Niters_used...). ``grad_x0_norm``: [3] gradient L1, L2, L-inf norms at x0
    (order 2). ``extra``: more keys, added last.
    """
    s = settings
    ras = run_args(s)
    keys = {"g_x0": np.float64(result.g_x0), "pred": task.logits.astype(np.float32)[None, :],
            "id": task.img_id, "true_label": task.true_label, "target_label": target.label,
            "info": target.info, "args": ras, "path": path}
    if s.order == 2:
        g = np.asarray(grad_x0_norm, np.float64)
        keys.update(H2_max=result.grad_max[:, 0], g_x0_grad_2_norm=np.float64(g[1]),
                    g_x0_grad_1_norm=np.float64(g[0]), g_x0_grad_inf_norm=np.float64(g[2]),
                    power_capped_batches=int(result.power_capped), power_iters=int(s.power_iters))
    else:
        keys.update(G1_max=result.grad_max[:, 0], G2_max=result.grad_max[:, 1],
                    Gi_max=result.grad_max[:, 2], L1_max=result.slope_max[:, 0],
                    L2_max=result.slope_max[:, 1], Li_max=result.slope_max[:, 2])
    keys.update({
        "radius": float(radius), "data_range": common.data_range_value(s.data_range),
        "sample_norm": s.sample_norm,
        "uniform_ball": int(s.uniform_ball), "sampler": s.sampler, "seed": s.seed,
        "Nsamps": s.Nsamps, "Niters": s.Niters, "Niters_used": int(len(result.grad_max)),
        "batch_size": s.batch_size, "dim": dim, "order": s.order,
        "transform": s.transform, "dataset": s.dataset, "model_name": model_name,
        "precision": s.precision, "jit_compile": int(bool(s.jit_compile)),
        "nan_batches": result.nan_batches, "zero_batches": result.zero_batches,
        "nan_samples": result.nan_samples, "zero_samples": result.zero_samples,
        "tool_version": versions.get("tool", ""), "tf_version": versions.get("tensorflow", ""),
        "keras_version": versions.get("keras", ""), "numpy_version": versions.get("numpy", ""),
        "provenance": json.dumps(common.provenance(ras, model_name=model_name, radius=radius)),
    })
    if extra:
        keys.update(extra)
    return keys


def mat_path(settings, out_dir: str, task: "ImageTask", target: "Target") -> str:
    """``<out_dir>/<Nsamp>_<Niters>_<id>_<true>_<target>_<info>_<act>_order<k>.mat``."""
    name = MatName(settings.Nsamps, settings.Niters, task.img_id, task.true_label, target.label,
                   target.info, settings.activation, settings.order).filename()
    return os.path.join(out_dir, name)


def plan_image_files(settings, tasks: Sequence["ImageTask"], out_dir: str,
                     check: Callable[[str], None] | None = None) -> list:
    """The pending work: [(task, [(target, path), ...]), ...] in task order.

    A file already present is skipped unless ``settings.overwrite``; ``check(path)``
    is called first for each such file and raises to refuse it (a file made with
    other settings: ``resume.ResumeCheck``). Images with nothing left to do (and
    misclassified ones, which have no targets) are left out.
    """
    work = []
    for task in tasks:
        pending = []
        for target in task.targets:
            path = mat_path(settings, out_dir, task, target)
            if os.path.exists(path) and not settings.overwrite:
                if check is not None:
                    check(path)  # a file made with other settings stops the run (resume.py)
                log.info("%s exists: skipped (use --overwrite to recompute)", path)
                continue
            pending.append((target, path))
        if pending:
            work.append((task, pending))
    return work


# --------------------------------------------------------------------------
# The run's pieces that need no TensorFlow (shared by stage1_run and the sweep)
# --------------------------------------------------------------------------
def image_ids(settings, num_test: int) -> tuple[list[int], dict]:
    """The test images of a run (``numimg``, ``firstimg``, ``ids``) and the user targets
    of an ids file: (ids, {id: [targets]}); ToolError names a bad flag."""
    user_targets = {}
    if settings.ids:
        from utils import read_ids_file

        ids, user_targets = read_ids_file(settings.ids)
        ids = ids[settings.firstimg:settings.firstimg + settings.numimg]
    else:
        if settings.firstimg >= num_test:
            raise ToolError(f"--firstimg {settings.firstimg} is beyond the {num_test} test images")
        ids = list(range(settings.firstimg, min(num_test, settings.firstimg + settings.numimg)))
    bad = [i for i in ids if not 0 <= i < num_test]
    if bad:
        raise ToolError(f"--ids: image id {bad[0]} is not in 0..{num_test - 1}")
    return ids, user_targets


#: Activations whose second derivative is zero almost everywhere.
_PIECEWISE_LINEAR = ("relu", "brelu", "leaky_relu", "relu6", "hard_sigmoid", "hard_tanh")


def piecewise_linear_layers(model) -> list[str]:
    """Names of the layers of a Keras model with ReLU-like (piecewise-linear) activations."""
    found = []
    for layer in getattr(model, "_flatten_layers", lambda **kw: [])(include_self=False):
        act = getattr(layer, "activation", None)
        name = getattr(act, "__name__", "") if act is not None else ""
        if type(layer).__name__ in ("ReLU", "LeakyReLU") or name in _PIECEWISE_LINEAR:
            found.append(layer.name)
    return found


def check_order2_model(settings, model, where: str = "") -> None:
    """Refuse --order 2 on a piecewise-linear model (its Hessian is zero almost everywhere)
    unless --force_order2; ``where`` (e.g. the sweep's model) prefixes the one-line error."""
    if settings.order != 2 or settings.force_order2:
        return
    flat = piecewise_linear_layers(model)
    if flat:
        raise ToolError(f"{where + ': ' if where else ''}--order 2: the model has "
                        f"piecewise-linear activations ({', '.join(flat[:3])}"
                        f"{'...' if len(flat) > 3 else ''}); its Hessian is zero almost "
                        "everywhere. Use a smooth model (e.g. --activation tanh) or "
                        "--force_order2")


def estimator_options(settings, estimator_class) -> dict:
    """Keyword arguments of GradientNormEstimator, those its constructor takes."""
    s = settings
    wanted = {"clip": s.data_range, "compute_slope": s.compute_slope, "order": s.order,
              "power_iters": s.power_iters, "precision": s.precision,
              "jit_compile": s.jit_compile}
    import inspect

    accepted = inspect.signature(estimator_class).parameters
    missing = [k for k in wanted if k not in accepted]
    if "precision" in missing and s.precision != "float32":
        raise ToolError(f"--precision {s.precision}: not supported by this "
                        "estimate_gradient_norm.py")
    return {k: v for k, v in wanted.items() if k in accepted}


def run_settings(settings, model, model_name: str, radius: float, rule) -> dict:
    """The settings recorded in every file and checked on resume (``resume.run_settings``)."""
    import resume

    s = settings
    if hasattr(model, "get_weights"):  # a Keras model; a bare graph is known by its name
        to_json = getattr(model, "to_json", None)
        identity = resume.model_digest(model.get_weights(), to_json() if to_json else "")
    else:
        identity = model_name
    return resume.run_settings(
        dataset=s.dataset, model=identity, data_range=s.data_range,
        sampler=s.sampler, sample_norm=s.sample_norm, radius=radius,
        uniform_ball=s.uniform_ball, seed=s.seed, transform=s.transform,
        order=s.order, power_iters=s.power_iters, compute_slope=s.compute_slope,
        precision=s.precision, jit_compile=s.jit_compile, batch_size=s.batch_size,
        nsamps=s.Nsamps, converge=rule.to_dict() if rule else None)


def power_cap_warning(capped: dict, power_iters: int) -> str | None:
    """The run's one warning about order 2's power iteration, or None.

    ``capped``: file path -> number of batches (iterations) in which a power
    iteration stopped at ``power_iters`` steps without converging.
    """
    hit = {p: n for p, n in capped.items() if n}
    if not hit:
        return None
    return (f"{len(hit)} of {len(capped)} files have batches whose power iteration stopped at "
            f"--power_iters {power_iters} without converging ({sum(hit.values())} batches in all, "
            f"recorded as power_capped_batches, e.g. {os.path.basename(next(iter(hit)))}); "
            "their curvature may be underestimated: raise --power_iters")


def pair_sequence(tasks: Sequence["ImageTask"]) -> dict:
    """(img_id, target label, info) -> the pair's position from 0 over all (image, target) pairs.

    The original's ``seq`` in ``[STATS][L1] total = ..., seq = ...``: pairs
    whose files already exist keep their number.
    """
    out = {}
    for task in tasks:
        for target in task.targets:
            out.setdefault((task.img_id, target.label, target.info), len(out))
    return out
