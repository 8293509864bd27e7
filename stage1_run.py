"""Stage 1 as a library call: :func:`collect` (settings in, one result per file out).

``collect_gradients.py`` is this function plus its printed lines
(``stage1_lines.LinePrinter``); ``reproduce_tables.py`` calls it for each model;
the Python API calls it with an in-memory model and images. The per-image work
is ``stage1.score_image`` and ``stage1.mat_record``, as in the sweep's workers.

Nothing is printed here (the drivers print through the hooks; diagnostics go
to ``logging``, the optional progress bar to stderr). TensorFlow is imported
when :func:`collect` runs, not at import.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

import common
import converge
import resume
import stage1
from common import ToolError
from settings import Stage1Settings

log = logging.getLogger("clever.collect")


@dataclass(frozen=True)
class FileResult:
    """One (image, target) of a run.

    ``record``: every key ``stage1.mat_record`` writes to the ``.mat`` file (the
    arrays are the file's, bit for bit: ``record["G2_max"]`` float64 [Niters_used]
    etc.); ``path``: the file written, or None when :func:`collect` wrote nothing
    (``record["path"]`` is then the file's name). ``info``: ``top2``, ``random``,
    ``least``, ``user`` or ``class<j>``. Labels are the model's class indices.
    """

    image_id: int
    true_label: int
    pred_label: int
    target_label: int
    info: str
    record: dict
    path: str | None


@dataclass
class Loaded:
    """What a run works on: ``test_data`` float32 [N, H, W, C] in the model's
    ``data_range``, ``test_labels`` one-hot float32 [N, K], ``ids`` the test
    images examined and ``user_targets`` {id: [targets]} of an ids file."""

    model: object
    model_label: str
    test_data: np.ndarray
    test_labels: np.ndarray
    ids: list
    user_targets: dict
    label_offset: int = 0


def load_model(settings: Stage1Settings):
    """The model of ``settings`` as the CLI loads it (logits; a final softmax removed)."""
    if settings.dataset == "imagenet":
        import imagenet_data

        return imagenet_data.stage1_model(
            model_name=settings.model_name, weights=settings.weights,
            model_path=settings.model_path, input_size=settings.input_size,
            models_dir=settings.models_dir)
    import models

    return models.load_model(settings.dataset, settings.model_name, settings.activation,
                             model_path=settings.model_path, models_dir=settings.models_dir)


def load(settings: Stage1Settings, model=None, images=None, labels=None,
         user_targets=None) -> Loaded:
    """The model and images of a run (see :func:`collect` for ``model``, ``images``,
    ``labels``, ``user_targets``). Dataset images are mapped onto ``settings.data_range``."""
    label_offset = 0
    label = settings.model_label
    if model is not None:
        import models

        model, notice = models.logits_model(model, "model")
        if notice:
            log.warning("%s", notice)
        label_offset = int(getattr(model, "background_class", False))
    if images is not None:
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ToolError(f"images: expected float32 [n, H, W, C], got shape {images.shape}")
        if model is None:
            model = load_model(settings)
            label_offset = int(getattr(model, "background_class", False))
        ids = list(range(len(images)))
        test_labels = None
        if labels is not None:
            labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                raise ToolError(f"labels: {len(labels)} labels for {len(images)} images")
            test_labels = labels  # class indices; one-hot once the classes are known
        mine = {int(i): [int(j) for j in t] for i, t in (user_targets or {}).items()}
        return Loaded(model, label, images, test_labels, ids, mine, label_offset)
    if settings.dataset == "imagenet":
        import imagenet_data

        if model is None:
            model, data, label_offset = imagenet_data.load_for_stage1(
                **imagenet_data.settings_for_stage1(settings))
        else:
            size = int(getattr(model, "image_size", None) or model.input_shape[1])
            data = imagenet_data.stage1_images(
                size, data_dir=settings.data_dir, numimg=settings.numimg,
                firstimg=settings.firstimg, ids=settings.ids, labels_file=settings.labels_file)
    else:
        import models

        data = models.load_dataset(settings.dataset, settings.data_dir)
        if model is None:
            model = load_model(settings)
    test_data = common.scale_to_range(data.test_data, settings.data_range)
    ids, user_targets = stage1.image_ids(settings, len(test_data))
    return Loaded(model, label, test_data, data.test_labels, ids, user_targets, label_offset)


def collect(settings: Stage1Settings, *, model=None, images: np.ndarray | None = None,
            labels: np.ndarray | None = None,
            user_targets: "Mapping[int, Sequence[int]] | None" = None, out_dir: str | None = None,
            on_file: Callable[[FileResult], None] | None = None, progress: bool = False,
            on_tasks: Callable[[list], None] | None = None,
            on_iteration: Callable[[object, list, object], None] | None = None
            ) -> list[FileResult]:
    """Run stage 1 with ``settings``; returns one :class:`FileResult` per (image, target).

    Args:
        settings: the run's :class:`settings.Stage1Settings`.
        model: None (load ``settings.model_path`` / ``model_name`` as the CLI
            does) or an in-memory Keras model that outputs logits (a final
            softmax is removed, as for a model file).
        images: None (load ``settings.dataset`` and examine ``numimg`` images
            from ``firstimg``, or the ``ids`` file, as the CLI does) or float32
            [n, H, W, C] already in the model's input range (``settings.data_range``),
            all examined, with ids 0..n-1.
        labels: None or int [n] true labels of ``images``; None with ``images``:
            the model's predicted class is taken as the true label.
        user_targets: with ``images`` only: {index: [target classes]} for the
            ``user`` target kind (``targets="user"``), as an ids file gives
            them for dataset images.
        out_dir: None writes nothing; a folder gets the usual ``.mat`` files,
            with the CLI's resume checks (an existing file made with other
            settings stops the run before anything changes; one made with these
            settings is kept and not returned, unless ``settings.overwrite``).
        on_file: called with each :class:`FileResult` once its file is written.
        progress: a tqdm progress bar on stderr.
        on_tasks: called with the ``utils.ImageTask`` list once the targets are chosen.
        on_iteration: ``on_iteration(task, targets, stats)`` after every iteration
            (``estimate_gradient_norm.IterationStats``).

    Returns:
        The results of the files computed by this call, in the order written.
    Raises:
        common.ToolError: one line naming the flag or file at fault.
    """
    from randsphere import BallSampler, SamplerPool

    s = settings
    if s.fix_dirty_bug:
        log.warning("--fix_dirty_bug is accepted for the original's command lines and does "
                    "nothing (the original marked it unsupported)")
    sampler = BallSampler.create(s.sample_norm, s.radius, s.uniform_ball, s.data_range)
    common.set_seed(s.seed)  # before building: --weights random is reproducible
    if user_targets and images is None:
        raise ToolError("user_targets: only with explicit images (dataset images take "
                        "theirs from --ids)")
    loaded = load(s, model, images, labels, user_targets)
    model = loaded.model
    from estimate_gradient_norm import GradientNormEstimator

    versions = common.versions()
    test_data, ids = loaded.test_data, loaded.ids
    input_shape = test_data.shape[1:]
    stage1.check_order2_model(s, model)
    estimator = GradientNormEstimator(model, input_shape, s.batch_size,
                                      **stage1.estimator_options(s, GradientNormEstimator))
    transform = s.transform or None
    clean = test_data[ids]
    defended = None
    if transform:
        # The defended classifier f(T(x0)) gives g(x0) and the targets; the samples are
        # drawn around the untransformed x0 (BPDA as the original).
        defended = stage1.defended_points(transform, clean, ids, s.seed, s.data_range)
    logits = estimator.logits(clean if defended is None else defended)
    test_labels = loaded.test_labels
    if test_labels is None or test_labels.ndim == 1:
        # Explicit images: labels given as class indices, or the model's own classes.
        classes = (np.argmax(logits, axis=1) - loaded.label_offset if test_labels is None
                   else test_labels)
        test_labels = np.zeros((len(test_data), logits.shape[1] - loaded.label_offset),
                               np.float32)
        test_labels[np.arange(len(test_data)), classes] = 1.0
    import utils

    # A 1001-output model's class 0 is "background": never a target (as the original).
    tasks = utils.generate_data(test_data, test_labels, logits, ids, s.kinds, s.seed,
                                loaded.user_targets,
                                excluded=(0,) if loaded.label_offset else (),
                                label_offset=loaded.label_offset, evaluated=defended)
    if on_tasks is not None:
        on_tasks(tasks)
    for task in tasks:
        if not task.correct:
            log.warning("image %d is misclassified (label %d, predicted %d): skipped",
                        task.img_id, task.true_label, task.predicted)

    rule = converge.rule_from_settings(s)
    run_settings = stage1.run_settings(s, model, loaded.model_label, sampler.radius, rule)
    if out_dir is not None:
        resume_check = resume.ResumeCheck(run_settings)
        # Planned before anything is touched: a file made with other settings stops the run
        # with nothing changed.
        work = stage1.plan_image_files(s, tasks, out_dir, check=resume_check)
        if resume_check.notice():
            log.warning(resume_check.notice())
        os.makedirs(out_dir, exist_ok=True)
        if common.remove_stale_temp_files(out_dir):
            log.warning("removed temporary files of an earlier run that was killed in %s",
                        out_dir)
        n_done = len(stage1.pair_sequence(tasks)) - sum(len(p) for _, p in work)
        if n_done:
            log.warning("%d result files already exist in %s and are kept (resume)", n_done,
                        out_dir)
    else:
        work = [(task, [(t, stage1.mat_path(s, "", task, t)) for t in task.targets])
                for task in tasks if task.targets]
    return _score(s, work, estimator, sampler, rule, run_settings, out_dir, loaded.model_label,
                  input_shape, versions, progress, on_file, on_iteration,
                  SamplerPool if s.sampler == "shm" else None)


def _score(s: Stage1Settings, work: list, estimator, sampler, rule, run_settings: dict,
           out_dir: str | None, model_label: str, input_shape: tuple, versions: dict,
           progress: bool, on_file, on_iteration, pool_class) -> list[FileResult]:
    """The iterations of every pending (image, targets) and their files."""
    from tqdm import tqdm

    dim = int(np.prod(input_shape))
    pool = None
    results: list[FileResult] = []
    capped: dict = {}  # order 2: file -> batches whose power iteration hit the cap
    saved = 0
    start = time.time()
    try:
        if pool_class is not None and work:
            pool = pool_class(sampler, input_shape, s.batch_size, s.nthreads,
                              s.transform or None, clip=s.data_range)
        bar = tqdm(total=len(work) * s.Niters, unit="it", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for task, pending in work:
            targets = [t for t, _ in pending]
            bar.set_postfix_str(f"image {task.img_id}, {len(targets)} targets")

            def iteration(st, task=task, targets=targets):
                if on_iteration is not None:
                    on_iteration(task, targets, st)
                bar.update(1)

            res = stage1.score_image(estimator, sampler, pool, task, targets, task.image,
                                     nsamps=s.Nsamps, niters=s.Niters, seed=s.seed,
                                     order=s.order, on_iteration=iteration,
                                     stop_rule=converge.make_stop_rule(rule) if rule else None,
                                     check_every=rule.check_every if rule else None)
            if res.niters_used < s.Niters:
                saved += s.Niters - res.niters_used
                bar.total -= s.Niters - res.niters_used
                bar.set_postfix_str(f"converged at {res.niters_used}; saved {saved} it "
                                    f"({100 * saved / (len(work) * s.Niters):.0f}%)")
                bar.refresh()
            for k, (target, path) in enumerate(pending):
                r = res.results[k]
                if r.nan_samples or r.zero_batches:
                    log.warning("image %d target %d: %d NaN gradient samples, %d batches whose "
                                "gradients are all zero (gradient masking?); recorded in %s",
                                task.img_id, target.label, r.nan_samples, r.zero_batches,
                                os.path.basename(path))
                grad_x0 = None if res.grad_x0_norms is None else res.grad_x0_norms[k]
                record = stage1.mat_record(s, task, target, r, path, model_name=model_label,
                                           dim=dim, radius=sampler.radius, versions=versions,
                                           grad_x0_norm=grad_x0,
                                           extra={**converge.provenance(
                                               rule, res.niters_used, s.Niters, res.checks),
                                               resume.SETTINGS_KEY: json.dumps(run_settings)})
                if out_dir is not None:
                    common.atomic_savemat(path, record)
                if s.order == 2:
                    capped[path] = r.power_capped
                result = FileResult(int(task.img_id), int(task.true_label), int(task.predicted),
                                    int(target.label), str(target.info), record,
                                    path if out_dir is not None else None)
                results.append(result)
                if on_file is not None:
                    on_file(result)
        bar.close()
        warning = stage1.power_cap_warning(capped, s.power_iters)
        if warning:
            log.warning(warning)
    finally:
        if pool is not None:
            pool.close()
    if out_dir is not None:
        log.info("%d files written to %s in %.1f s", len(results), out_dir, time.time() - start)
    return results


def run_lines(settings: Stage1Settings, stream, *, out_dir: str | None = None,
              **kwargs) -> list[FileResult]:
    """:func:`collect` writing the original's lines to ``stream`` (``collect_gradients.py``'s
    stdout; ``reproduce_tables.py``'s logs): the settings dict first, then ``[DATAGEN]``,
    ``[STATS][L2]`` (unless ``settings.quiet``) and ``[STATS][L1]`` lines."""
    from stage1_lines import LinePrinter

    # The original printed its argument dict first; scripts that parse logs expect it.
    print(settings.as_dict(), file=stream, flush=True)
    printer = LinePrinter(stream, quiet=settings.quiet, compute_slope=settings.compute_slope)
    return collect(settings, out_dir=out_dir, on_tasks=printer.on_tasks,
                   on_iteration=printer.on_iteration, on_file=printer.on_file, **kwargs)


def default_out_dir(settings: Stage1Settings) -> str:
    """``<save>/<dataset>_<model>``: where the CLI writes."""
    return settings.out_dir()


__all__: Sequence[str] = ("FileResult", "Loaded", "collect", "default_out_dir", "load",
                          "load_model", "run_lines")
