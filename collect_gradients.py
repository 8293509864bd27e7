#!/usr/bin/env python3
"""Stage 1 of CLEVER: sample gradient norms around test images.

For each test image and target class, draw N_b = --Niters batches of
N_s = --Nsamps points in an Lp ball around the image, compute the norms of
the gradient of g(x) = f_c(x) - f_j(x), and write one .mat file per
(image, target) with the per-batch maxima (format: docs/format.md), e.g.

    python collect_gradients.py -d digits -m normal -n 10 -N 1024 -i 500

Files already present are skipped, so an interrupted run resumes when run
again. Stage 2 is ``clever.py <save>/<dataset>_<model>``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

import numpy as np

import common
import converge
import resume
from common import DEFAULT_RADIUS, DEFAULT_TARGET_TYPE, SAMPLE_NORMS, ToolError, check_positive

log = logging.getLogger("clever.collect")

DATASETS = ("digits", "mnist", "cifar", "imagenet")
SAMPLERS = ("tf", "shm")
PRECISIONS = ("float32", "tf32", "mixed_float16")
#: Model batch size of the original tool per dataset.
DEFAULT_BATCH = {"imagenet": 32}
DEFAULT_BATCH_OTHER = 1024


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="collect_gradients.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("-d", "--dataset", choices=DATASETS, default="digits",
                   help="dataset; digits is scikit-learn's bundled set and works offline")
    g.add_argument("-m", "--model_name", default="normal",
                   help="model: normal, distilled, brelu, 2-layer, a file stem under "
                        "--models_dir, or an ImageNet zoo name")
    g.add_argument("--activation", default="relu", help="activation of the 'normal' model")
    g.add_argument("--model_path", default=None,
                   help="your own Keras model (.keras, .h5 or SavedModel folder) that outputs "
                        "logits; the output folder is then named after the file's stem")
    g.add_argument("--models_dir", default="models", help="folder of the trained models")
    g.add_argument("--data_dir", default="data", help="folder of the dataset files")
    g.add_argument("--weights", default="imagenet",
                   help="ImageNet weights: imagenet (Keras cache), random, a weights file, or "
                        "an original frozen graph (.pb)")
    g.add_argument("--labels_file", default=None,
                   help="ImageNet: a file of 'filename label' lines (labels from 0) instead of "
                        "labels in the image names ('<label>.<anything>.jpg', from 1)")
    g.add_argument("--input_size", type=int, default=None,
                   help="ImageNet: build the zoo model for this image size instead of its own")
    g = p.add_argument_group("images and targets")
    g.add_argument("-n", "--numimg", type=int, default=1, help="number of images to examine")
    g.add_argument("-f", "--firstimg", type=int, default=0, help="index of the first image")
    g.add_argument("--ids", default="",
                   help="file of image ids: the original's tab-separated file with a header "
                        "row (columns id and, for user targets, target), or a CSV of "
                        "id[,target,...] rows; --firstimg/--numimg then slice this list")
    g.add_argument("--target_type", type=lambda s: int(s, 0), default=DEFAULT_TARGET_TYPE,
                   help="bit mask of the original tool: 1 top2, 2 random, 4 least, "
                        "8 user (--ids), 16 all classes (untargeted)")
    g.add_argument("--targets", default=None,
                   help="readable form of --target_type: comma list of top2,random,least,"
                        "user,all (overrides --target_type)")
    g.add_argument("--fix_dirty_bug", action="store_true",
                   help="accepted for the original's command lines; does nothing (the original "
                        "marked it unsupported)")
    g = p.add_argument_group("sampling")
    converge.add_arguments(g)
    g.add_argument("-N", "--Nsamps", type=int, default=1024, help="samples per batch (N_s)")
    g.add_argument("-i", "--Niters", type=int, default=500, help="number of batches (N_b)")
    g.add_argument("--sample_norm", choices=tuple(SAMPLE_NORMS), default="l2",
                   help="norm of the sampling ball")
    g.add_argument("--radius", type=float, default=None,
                   help="sampling radius R (default: the original's "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RADIUS.items())
                        + ", times the width of --data_range)")
    g.add_argument("--data_range", nargs="+", metavar="LO HI",
                   default=[f"{v:g}" for v in common.DEFAULT_DATA_RANGE],
                   help="the model's input range: the images are scaled into it and every "
                        "sampled point is clipped to it; none: unbounded inputs, no clipping "
                        "(needs --radius)")
    g.add_argument("--uniform_ball", action="store_true",
                   help="sample uniformly in the ball of radius R (the paper) instead of the "
                        "original tool's direction-times-uniform-scale scheme")
    g.add_argument("--sampler", choices=SAMPLERS + ("auto",), default="auto",
                   help="draw samples in the TensorFlow graph (tf) or in shared-memory worker "
                        "processes (shm); auto is tf, or shm with --transform")
    g.add_argument("--nthreads", type=int, default=0,
                   help="sampling worker processes for --sampler shm (0: automatic)")
    g.add_argument("--transform", default="",
                   help="input transformation evaluated with BPDA: defend_reduce, defend_jpeg, "
                        "defend_png, defend_none")
    g.add_argument("--order", type=int, choices=(1, 2), default=1,
                   help="1: gradient norms; 2: second-order CLEVER (curvature)")
    g.add_argument("--power_iters", type=int, default=500,
                   help="maximum power-iteration steps; stops when the estimate changes by less "
                        "than 1e-3 (--order 2)")
    g.add_argument("--force_order2", action="store_true",
                   help="run --order 2 on a model with ReLU-like activations, whose Hessian "
                        "is zero almost everywhere")
    g.add_argument("--compute_slope", action="store_true",
                   help="also store SLOPE estimates (L1_max, L2_max, Li_max)")
    g.add_argument("-b", "--batch_size", type=int, default=0,
                   help="model batch size (0: 1024, or 32 for imagenet)")
    g.add_argument("--seed", type=int, default=1215, help="random seed")
    g.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="arithmetic of the model's gradients: float32 (TensorFloat-32 off), tf32 "
                        "or mixed_float16 (faster on GPUs, less exact)")
    g.add_argument("--jit_compile", action="store_true",
                   help="compile the gradient computation with XLA")
    g = p.add_argument_group("output")
    g.add_argument("-s", "--save", default="./lipschitz_mat", help="results folder")
    g.add_argument("--overwrite", action="store_true", help="recompute existing result files")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="omit the per-iteration [STATS][L2] lines")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    _validate(args)
    return args


def _validate(args) -> None:
    """Checks that need no data or model, so bad flags fail in a second."""
    check_positive("--Nsamps", args.Nsamps)
    check_positive("--Niters", args.Niters)
    check_positive("--numimg", args.numimg)
    check_positive("--firstimg", args.firstimg, allow_zero=True)
    check_positive("--batch_size", args.batch_size, allow_zero=True)
    check_positive("--nthreads", args.nthreads, allow_zero=True)
    if args.radius is not None:
        check_positive("--radius", args.radius)
    args.data_range = common.parse_data_range(args.data_range)
    if args.data_range is None:
        if args.radius is None:
            common.default_radius(args.sample_norm, None)  # the one-line error asking for it
        if args.transform:
            raise ToolError("--transform: the transformations work on images of a bounded "
                            "range; not with --data_range none")
    if args.compute_slope and args.Nsamps < 2:
        raise ToolError("--compute_slope needs --Nsamps of at least 2 (pairs of samples)")
    check_positive("--power_iters", args.power_iters)
    converge.rule_from_args(args)  # a bad --converge/--min_iters/--check_every fails here
    if args.order == 2 and args.compute_slope:
        raise ToolError("--compute_slope applies to --order 1 only")
    args.kinds = (common.target_kinds_from_names(args.targets) if args.targets
                  else common.target_kinds_from_mask(args.target_type))
    if args.sampler == "auto":
        args.sampler = "shm" if args.transform else "tf"
    if args.transform and args.sampler == "tf":
        raise ToolError("--transform runs in the sampling workers: use --sampler shm")
    if args.transform:
        import defense

        defense.get_transform(args.transform)  # a clear error listing the valid names
    if not args.batch_size:
        args.batch_size = DEFAULT_BATCH.get(args.dataset, DEFAULT_BATCH_OTHER)
    if args.nthreads == 0:
        args.nthreads = max(1, min(4, (os.cpu_count() or 2) // 2))
    if args.model_path and not os.path.exists(args.model_path):
        raise ToolError(f"--model_path: {args.model_path} does not exist")


# --------------------------------------------------------------------------
def _load(args):
    """Load the dataset and the model. Returns (model, test_data, test_labels, name, offset).

    ``test_data`` is scaled into ``--data_range``.
    """
    import models

    if args.dataset == "imagenet":
        import setup_imagenet

        model, data, label_offset = setup_imagenet.load_for_stage1(args)
        name = (os.path.splitext(os.path.basename(os.path.normpath(args.model_path)))[0]
                if args.model_path else args.model_name)
        return (model, common.scale_to_range(data.test_data, args.data_range), data.test_labels,
                name, label_offset)
    data = models.load_dataset(args.dataset, args.data_dir)
    model = models.load_model(args.dataset, args.model_name, args.activation,
                              model_path=args.model_path, models_dir=args.models_dir)
    name = (os.path.splitext(os.path.basename(os.path.normpath(args.model_path)))[0]
            if args.model_path else args.model_name)
    return model, common.scale_to_range(data.test_data, args.data_range), data.test_labels, name, 0


def image_ids(args, num_test: int):
    user_targets = {}
    if args.ids:
        from utils import read_ids_file

        ids, user_targets = read_ids_file(args.ids)
        ids = ids[args.firstimg:args.firstimg + args.numimg]
    else:
        if args.firstimg >= num_test:
            raise ToolError(f"--firstimg {args.firstimg} is beyond the {num_test} test images")
        ids = list(range(args.firstimg, min(num_test, args.firstimg + args.numimg)))
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


def _iteration_line(st, k: int, target_label: int, elapsed: float) -> str:
    """The original's per-iteration ``[STATS][L2]`` line for target ``k`` of ``st``.

    Order 1 reports the gradient norms (G2, G1, Ginf), preceded by the SLOPE
    maxima (L2, L1, Linf) with --compute_slope; order 2 the curvature H2.
    ``target_class`` at the end is this toolkit's (all targets share a loop).
    """
    g = st.grad_max[k]
    if len(g) == 1:
        values = f"H2 = {g[0]:.5g}"
    else:
        values = f"G2 = {g[1]:.5g}, G1 = {g[0]:.5g}, Ginf = {g[2]:.5g}"
        if st.slope_max is not None:
            s = st.slope_max[k]
            values = f"L2 = {s[1]:.5g}, L1 = {s[0]:.5g}, Linf = {s[2]:.5g}, " + values
    return (f"[STATS][L2] loop = {st.iteration}, time = {elapsed:.5g}, iter_time = "
            f"{st.seconds:.5g}, overhead = {st.wait:.5g}, {values}, target_class = {target_label}")


def _summary_lines(result, compute_slope: bool, grad_x0_norm=None) -> list[str]:
    """The original's per-(image, target) ``[STATS][L1]`` lines after the iterations.

    Order 1: g_x0 and the maxima over iterations, then the bounds g_x0 / max
    with the dual norms (bnd_G2 from G2, bnd_G1 from Ginf, bnd_Ginf from G1;
    likewise for the slopes). Order 2 (``grad_x0_norm`` = [L1, L2, Linf] of
    the gradient at x0): the gradient norms, max |H2| and the second-order bound.
    """
    g0 = np.float64(result.g_x0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if grad_x0_norm is not None:
            g1, g2, gi = (np.float64(v) for v in grad_x0_norm)
            h = np.float64(np.max(np.abs(result.grad_max[:, 0])))
            # H = 0 (no curvature): the bound's limit, the first-order g_x0 / ||grad||.
            bnd = (-g2 + np.sqrt(g2 ** 2 + 2 * g0 * h)) / h if h != 0 else g0 / g2
            return [f"[STATS][L1] g_x0 = {g0:.5g}, g_x0_grad_2_norm = {g2:.5g}, g_x0_grad_1_norm = "
                    f"{g1:.5g}, g_x0_grad_inf_norm = {gi:.5g}, H2_max = {h:.5g}",
                    f"[STATS][L1] bnd_H2_max = {bnd:.5g}"]
        G1, G2, Gi = (np.float64(np.max(result.grad_max[:, c])) for c in range(3))
        L1, L2, Li = (np.float64(np.max(result.slope_max[:, c])) for c in range(3))
        lines = [f"[STATS][L1] g_x0 = {g0:.5g}, L2_max = {L2:.5g}, L1_max = {L1:.5g}, Linf_max = "
                 f"{Li:.5g}, G2_max = {G2:.5g}, G1_max = {G1:.5g}, Ginf_max = {Gi:.5g}"]
        grad_bnd = (f"bnd_G2_max = {g0 / G2:.5g}, bnd_G1_max = {g0 / Gi:.5g}, "
                    f"bnd_Ginf_max = {g0 / G1:.5g}")
        if compute_slope:
            lines.append(f"[STATS][L1] bnd_L2_max = {g0 / L2:.5g}, bnd_L1_max = {g0 / Li:.5g}, "
                         f"bnd_Linf_max = {g0 / L1:.5g}, " + grad_bnd)
        else:
            lines.append("[STATS][L1] " + grad_bnd)
    return lines


def estimator_options(args, estimator_class) -> dict:
    """Keyword arguments of GradientNormEstimator, those its constructor takes."""
    wanted = {"clip": args.data_range, "compute_slope": args.compute_slope, "order": args.order,
              "power_iters": args.power_iters, "precision": args.precision,
              "jit_compile": args.jit_compile}
    import inspect

    accepted = inspect.signature(estimator_class).parameters
    missing = [k for k in wanted if k not in accepted]
    if "precision" in missing and args.precision != "float32":
        raise ToolError(f"--precision {args.precision}: not supported by this estimate_gradient_norm.py")
    return {k: v for k, v in wanted.items() if k in accepted}


def run_settings(args, model, model_name: str, radius: float, rule) -> dict:
    """The settings recorded in every file and checked on resume (``resume.run_settings``)."""
    if hasattr(model, "get_weights"):  # a Keras model; a bare graph is known by its name
        to_json = getattr(model, "to_json", None)
        identity = resume.model_digest(model.get_weights(), to_json() if to_json else "")
    else:
        identity = model_name
    return resume.run_settings(
        dataset=args.dataset, model=identity, data_range=args.data_range,
        sampler=args.sampler, sample_norm=args.sample_norm, radius=radius,
        uniform_ball=args.uniform_ball, seed=args.seed, transform=args.transform,
        order=args.order, power_iters=args.power_iters, compute_slope=args.compute_slope,
        precision=args.precision, jit_compile=args.jit_compile, batch_size=args.batch_size,
        nsamps=args.Nsamps, converge=rule.to_dict() if rule else None)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    common.setup_logging(args.verbose)
    # The original printed its argument dict first; scripts that parse logs expect it.
    print({k: v for k, v in vars(args).items() if k != "kinds"}, flush=True)
    if args.fix_dirty_bug:
        log.warning("--fix_dirty_bug is accepted for the original's command lines and does "
                    "nothing (the original marked it unsupported)")
    from tqdm import tqdm

    import stage1
    import utils
    from randsphere import BallSampler, SamplerPool

    sampler = BallSampler.create(args.sample_norm, args.radius, args.uniform_ball,
                                 args.data_range)
    common.set_seed(args.seed)  # before building: --weights random is reproducible
    model, test_data, test_labels, model_name, label_offset = _load(args)
    from estimate_gradient_norm import GradientNormEstimator

    versions = common.versions()
    input_shape = test_data.shape[1:]
    dim = int(np.prod(input_shape))
    ids, user_targets = image_ids(args, len(test_data))
    if args.order == 2 and not args.force_order2:
        flat = piecewise_linear_layers(model)
        if flat:
            raise ToolError(f"--order 2: the model has piecewise-linear activations "
                            f"({', '.join(flat[:3])}{'...' if len(flat) > 3 else ''}); its "
                            "Hessian is zero almost everywhere. Use a smooth model (e.g. "
                            "--activation tanh) or --force_order2")
    estimator = GradientNormEstimator(model, input_shape, args.batch_size,
                                      **estimator_options(args, GradientNormEstimator))

    transform = args.transform or None
    clean = test_data[ids]
    defended = None
    if transform:
        # The defended classifier f(T(x0)) gives g(x0) and the targets; the samples are
        # drawn around the untransformed x0 (BPDA as the original).
        defended = stage1.defended_points(transform, clean, ids, args.seed, args.data_range)
    logits = estimator.logits(clean if defended is None else defended)
    # A 1001-output model's class 0 is "background": never a target (as the original).
    tasks = utils.generate_data(test_data, test_labels, logits, ids, args.kinds, args.seed,
                                user_targets, excluded=(0,) if label_offset else (),
                                label_offset=label_offset, evaluated=defended)
    for task in tasks:
        print(utils.datagen_line(task), flush=True)
        if not task.correct:
            log.warning("image %d is misclassified (label %d, predicted %d): skipped",
                        task.img_id, task.true_label, task.predicted)

    out_dir = common.output_dir(args.save, args.dataset, model_name)
    rule = converge.rule_from_args(args)
    settings = run_settings(args, model, model_name, sampler.radius, rule)
    resume_check = resume.ResumeCheck(settings)
    # Planned before anything is touched: a file made with other settings stops the run
    # with nothing changed.
    work = stage1.plan_image_files(args, tasks, out_dir, check=resume_check)
    if resume_check.notice():
        log.warning(resume_check.notice())
    os.makedirs(out_dir, exist_ok=True)
    if common.remove_stale_temp_files(out_dir):
        log.warning("removed temporary files of an earlier run that was killed in %s", out_dir)
    seq_of = stage1.pair_sequence(tasks)
    n_done = len(seq_of) - sum(len(p) for _, p in work)
    if n_done:
        log.warning("%d result files already exist in %s and are kept (resume)", n_done, out_dir)

    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    pool = None
    written = 0
    capped: dict = {}  # order 2: file -> batches whose power iteration hit the cap
    saved = 0
    start = time.time()
    try:
        if args.sampler == "shm" and work:
            pool = SamplerPool(sampler, input_shape, args.batch_size, args.nthreads, transform,
                               clip=args.data_range)
        bar = tqdm(total=len(work) * args.Niters, unit="it", disable=args.no_progress,
                   file=sys.stderr, dynamic_ncols=True)
        for task, pending in work:
            targets = [t for t, _ in pending]
            bar.set_postfix_str(f"image {task.img_id}, {len(targets)} targets")

            def on_iteration(st, targets=targets):
                if not args.quiet:
                    for k, target in enumerate(targets):
                        print(_iteration_line(st, k, target.label, time.time() - start))
                bar.update(1)

            res = stage1.score_image(estimator, sampler, pool, task, targets, task.image,
                                     nsamps=args.Nsamps, niters=args.Niters, seed=args.seed,
                                     order=args.order, on_iteration=on_iteration,
                                     stop_rule=converge.make_stop_rule(rule) if rule else None,
                                     check_every=rule.check_every if rule else None)
            if res.niters_used < args.Niters:
                saved += args.Niters - res.niters_used
                bar.total -= args.Niters - res.niters_used
                bar.set_postfix_str(f"converged at {res.niters_used}; saved {saved} it "
                                    f"({100 * saved / (len(work) * args.Niters):.0f}%)")
                bar.refresh()
            for k, (target, path) in enumerate(pending):
                r = res.results[k]
                if r.nan_samples or r.zero_batches:
                    log.warning("image %d target %d: %d NaN gradient samples, %d batches whose "
                                "gradients are all zero (gradient masking?); recorded in %s",
                                task.img_id, target.label, r.nan_samples, r.zero_batches,
                                os.path.basename(path))
                grad_x0 = None if res.grad_x0_norms is None else res.grad_x0_norms[k]
                record = stage1.mat_record(args, task, target, r, path, model_name=model_name,
                                           dim=dim, radius=sampler.radius, versions=versions,
                                           grad_x0_norm=grad_x0,
                                           extra={**converge.provenance(
                                               rule, res.niters_used, args.Niters, res.checks),
                                               resume.SETTINGS_KEY: json.dumps(settings)})
                common.atomic_savemat(path, record)
                written += 1
                if args.order == 2:
                    capped[path] = r.power_capped
                seq = seq_of[(task.img_id, target.label, target.info)]
                for line in _summary_lines(r, args.compute_slope, grad_x0):
                    print(line)
                print("[STATS][L1] total = {}, seq = {}, id = {}, time = {:.3f}, true_class = {}, "
                      "target_class = {}, info = {}".format(seq + 1, seq, task.img_id,
                                                            time.time() - start, task.true_label,
                                                            target.label, target.info), flush=True)
        bar.close()
        warning = stage1.power_cap_warning(capped, args.power_iters)
        if warning:
            log.warning(warning)
    finally:
        if pool is not None:
            pool.close()
        signal.signal(signal.SIGTERM, previous)
    log.info("%d files written to %s in %.1f s", written, out_dir, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog="collect_gradients.py"))
