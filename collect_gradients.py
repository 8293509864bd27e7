#!/usr/bin/env python3
"""Stage 1 of CLEVER: sample gradient norms around test images.

For each test image and target class, draw N_b = --Niters batches of
N_s = --Nsamps points in an Lp ball around the image, compute the norms of
the gradient of g(x) = f_c(x) - f_j(x), and write one .mat file per
(image, target) with the per-batch maxima (format: SPEC section 3), e.g.

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
from common import (DEFAULT_RADIUS, DEFAULT_TARGET_TYPE, SAMPLE_NORMS, MatName, ToolError,
                    check_positive)

log = logging.getLogger("clever.collect")

DATASETS = ("digits", "mnist", "cifar", "imagenet")
SAMPLERS = ("tf", "shm")
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
    g.add_argument("-n", "--numimg", type=int, default=10, help="number of images to examine")
    g.add_argument("-f", "--firstimg", type=int, default=0, help="index of the first image")
    g.add_argument("--ids", default="",
                   help="CSV of image ids, one per row, each optionally followed by target "
                        "classes (id[,target,...]); --firstimg/--numimg then slice this list")
    g.add_argument("--target_type", type=lambda s: int(s, 0), default=DEFAULT_TARGET_TYPE,
                   help="bit mask of the original tool: 1 top2, 2 random, 4 least, "
                        "8 user (--ids), 16 all classes (untargeted)")
    g.add_argument("--targets", default=None,
                   help="readable form of --target_type: comma list of top2,random,least,"
                        "user,all (overrides --target_type)")
    g = p.add_argument_group("sampling")
    g.add_argument("-N", "--Nsamps", type=int, default=1024, help="samples per batch (N_s)")
    g.add_argument("-i", "--Niters", type=int, default=500, help="number of batches (N_b)")
    g.add_argument("--sample_norm", choices=tuple(SAMPLE_NORMS), default="l2",
                   help="norm of the sampling ball")
    g.add_argument("--radius", type=float, default=None,
                   help="sampling radius R (default: the original's "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RADIUS.items()) + ")")
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
    g.add_argument("--power_iters", type=int, default=20,
                   help="power-iteration steps per curvature estimate (--order 2)")
    g.add_argument("--force_order2", action="store_true",
                   help="run --order 2 on a model with ReLU-like activations, whose Hessian "
                        "is zero almost everywhere")
    g.add_argument("--compute_slope", action="store_true",
                   help="also store SLOPE estimates (L1_max, L2_max, Li_max)")
    g.add_argument("-b", "--batch_size", type=int, default=0,
                   help="model batch size (0: 1024, or 32 for imagenet)")
    g.add_argument("--seed", type=int, default=1215, help="random seed")
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
    if args.compute_slope and args.Nsamps < 2:
        raise ToolError("--compute_slope needs --Nsamps of at least 2 (pairs of samples)")
    check_positive("--power_iters", args.power_iters)
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
    """Load the dataset and the model. Returns (model, test_data, test_labels, name, offset)."""
    import models

    if args.dataset == "imagenet":
        import setup_imagenet

        model, data, label_offset = setup_imagenet.load_for_stage1(args)
        name = (os.path.splitext(os.path.basename(os.path.normpath(args.model_path)))[0]
                if args.model_path else args.model_name)
        return model, data.test_data, data.test_labels, name, label_offset
    data = models.load_dataset(args.dataset, args.data_dir)
    model = models.load_model(args.dataset, args.model_name, args.activation,
                              model_path=args.model_path, models_dir=args.models_dir)
    name = (os.path.splitext(os.path.basename(os.path.normpath(args.model_path)))[0]
            if args.model_path else args.model_name)
    return model, data.test_data, data.test_labels, name, 0


def _image_ids(args, num_test: int):
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


def _spec_keys(args, task, target, result, logits0, path, grad_x0_norm=None):
    """The keys of SPEC section 3 for one (image, target), first or second order."""
    keys = {"g_x0": np.float64(result.g_x0), "pred": logits0.astype(np.float32)[None, :],
            "id": task.img_id, "true_label": task.true_label, "target_label": target.label,
            "info": target.info, "args": _run_args(args), "path": path}
    if args.order == 2:
        keys.update(H2_max=result.grad_max[:, 0], g_x0_grad_2_norm=np.float64(grad_x0_norm))
    else:
        keys.update(G1_max=result.grad_max[:, 0], G2_max=result.grad_max[:, 1],
                    Gi_max=result.grad_max[:, 2], L1_max=result.slope_max[:, 0],
                    L2_max=result.slope_max[:, 1], Li_max=result.slope_max[:, 2])
    return keys


def _run_args(args) -> dict:
    """The run's arguments as a MATLAB-storable dict (None becomes '')."""
    out = {k: ("" if v is None else v) for k, v in vars(args).items() if k != "kinds"}
    out["targets_resolved"] = ",".join(k.name.lower() for k in args.kinds)
    return out


def _provenance_keys(args, result, model_name, dim, radius, versions) -> dict:
    """Keys this toolkit adds: what is needed to reproduce a file and to cap its bound."""
    return {
        "radius": float(radius), "sample_norm": args.sample_norm,
        "uniform_ball": int(args.uniform_ball), "sampler": args.sampler, "seed": args.seed,
        "Nsamps": args.Nsamps, "Niters": args.Niters, "batch_size": args.batch_size,
        "dim": dim, "order": args.order, "transform": args.transform,
        "dataset": args.dataset, "model_name": model_name,
        "nan_batches": result.nan_batches, "zero_batches": result.zero_batches,
        "nan_samples": result.nan_samples, "zero_samples": result.zero_samples,
        "tool_version": versions.get("tool", ""), "tf_version": versions.get("tensorflow", ""),
        "keras_version": versions.get("keras", ""), "numpy_version": versions.get("numpy", ""),
        "provenance": json.dumps(common.provenance(_run_args(args), model_name=model_name,
                                                   radius=radius)),
    }


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

    Order 1 reports the gradient norms (G2, G1, Ginf), order 2 the curvature H2.
    """
    g = st.grad_max[k]
    values = (f"H2 = {g[0]:.5g}" if len(g) == 1
              else f"G2 = {g[1]:.5g}, G1 = {g[0]:.5g}, Ginf = {g[2]:.5g}")
    return (f"[STATS][L2] loop = {st.iteration}, time = {elapsed:.5g}, iter_time = "
            f"{st.seconds:.5g}, overhead = {st.wait:.5g}, {values}, target_class = {target_label}")


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    common.setup_logging(args.verbose)
    from tqdm import tqdm

    import utils
    from randsphere import BallSampler, SamplerPool

    sampler = BallSampler.create(args.sample_norm, args.radius, args.uniform_ball)
    common.set_seed(args.seed)  # before building: --weights random is reproducible
    model, test_data, test_labels, model_name, label_offset = _load(args)
    from estimate_gradient_norm import GradientNormEstimator, TargetResult

    versions = common.versions()
    input_shape = test_data.shape[1:]
    dim = int(np.prod(input_shape))
    ids, user_targets = _image_ids(args, len(test_data))
    if args.order == 2 and not args.force_order2:
        flat = piecewise_linear_layers(model)
        if flat:
            raise ToolError(f"--order 2: the model has piecewise-linear activations "
                            f"({', '.join(flat[:3])}{'...' if len(flat) > 3 else ''}); its "
                            "Hessian is zero almost everywhere. Use a smooth model (e.g. "
                            "--activation tanh) or --force_order2")
    estimator = GradientNormEstimator(model, input_shape, args.batch_size,
                                      compute_slope=args.compute_slope, order=args.order,
                                      power_iters=args.power_iters)

    transform = args.transform or None
    clean = test_data[ids]
    if transform:
        import defense

        clean = defense.apply_transform(transform, clean)  # the model sees T(x0)
    logits = estimator.logits(clean)
    # A 1001-output model's class 0 is "background": never a target (as the original).
    tasks = utils.generate_data(test_data, test_labels, logits, ids, args.kinds, args.seed,
                                user_targets, excluded=(0,) if label_offset else (),
                                label_offset=label_offset)
    for task in tasks:
        print(utils.datagen_line(task), flush=True)
        if not task.correct:
            log.warning("image %d is misclassified (label %d, predicted %d): skipped",
                        task.img_id, task.true_label, task.predicted)
    evaluated = {task.img_id: x for task, x in zip(tasks, clean)}  # T(x0) with --transform

    out_dir = common.output_dir(args.save, args.dataset, model_name)
    os.makedirs(out_dir, exist_ok=True)
    if common.remove_stale_temp_files(out_dir):
        log.warning("removed temporary files of an earlier run that was killed in %s", out_dir)
    work = []
    for task in tasks:
        pending = []
        for target in task.targets:
            name = MatName(args.Nsamps, args.Niters, task.img_id, task.true_label, target.label,
                           target.info, args.activation, args.order).filename()
            path = os.path.join(out_dir, name)
            if os.path.exists(path) and not args.overwrite:
                log.info("%s exists: skipped (use --overwrite to recompute)", path)
                continue
            pending.append((target, path))
        if pending:
            work.append((task, pending))
    n_done = sum(len(t.targets) for t in tasks) - sum(len(p) for _, p in work)
    if n_done:
        log.warning("%d result files already exist in %s and are kept (resume)", n_done, out_dir)

    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    pool = None
    total = 0
    start = time.time()
    try:
        if args.sampler == "shm" and work:
            pool = SamplerPool(sampler, input_shape, args.batch_size, args.nthreads, transform)
        bar = tqdm(total=len(work) * args.Niters, unit="it", disable=args.no_progress,
                   file=sys.stderr, dynamic_ncols=True)
        for task, pending in work:
            targets = [t for t, _ in pending]
            labels = [t.label for t in targets]
            bar.set_postfix_str(f"image {task.img_id}, {len(labels)} targets")
            grad = np.full((args.Niters, len(labels), 3 if args.order == 1 else 1), np.nan)
            slope = np.zeros((args.Niters, len(labels), 3))
            nan_s = np.zeros(len(labels), np.int64)
            zero_s = np.zeros(len(labels), np.int64)
            nan_b = np.zeros(len(labels), np.int64)
            zero_b = np.zeros(len(labels), np.int64)
            t_img = time.time()
            for st in estimator.iterate(evaluated[task.img_id], task.predicted, labels, args.Nsamps,
                                        args.Niters, args.seed, task.img_id, sampler, pool):
                grad[st.iteration] = st.grad_max
                if st.slope_max is not None:
                    slope[st.iteration] = st.slope_max
                nan_s += st.nan
                zero_s += st.zero
                nan_b += st.nan > 0
                zero_b += st.zero >= args.Nsamps
                if not args.quiet:
                    for k, target in enumerate(targets):
                        print(_iteration_line(st, k, target.label, time.time() - start))
                bar.update(1)
            seconds = time.time() - t_img
            grad_x0 = None
            if args.order == 2:
                grad_x0 = estimator.gradient_norms_at(evaluated[task.img_id], task.predicted, labels)
            for k, (target, path) in enumerate(pending):
                res = TargetResult(target.label,
                                   float(task.logits[task.predicted] - task.logits[target.label]),
                                   grad[:, k], slope[:, k], int(nan_b[k]), int(zero_b[k]),
                                   int(nan_s[k]), int(zero_s[k]), seconds)
                if res.nan_samples or res.zero_batches:
                    log.warning("image %d target %d: %d NaN gradient samples, %d batches whose "
                                "gradients are all zero (gradient masking?); recorded in %s",
                                task.img_id, target.label, res.nan_samples, res.zero_batches,
                                os.path.basename(path))
                record = _spec_keys(args, task, target, res, task.logits, path,
                                    grad_x0[k, 1] if args.order == 2 else None)
                record.update(_provenance_keys(args, res, model_name, dim, sampler.radius,
                                               versions))
                common.atomic_savemat(path, record)
                total += 1
                print("[STATS][L1] total = {}, seq = {}, id = {}, time = {:.3f}, true_class = {}, "
                      "target_class = {}, info = {}".format(total, task.seq_no, task.img_id,
                                                            seconds, task.true_label, target.label,
                                                            target.info), flush=True)
        bar.close()
    finally:
        if pool is not None:
            pool.close()
        signal.signal(signal.SIGTERM, previous)
    log.info("%d files written to %s in %.1f s", total, out_dir, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog="collect_gradients.py"))
