"""The worker side of ``sweep.py``: what runs inside Ray actors and tasks.

:class:`ModelWorker` (wrapped as a Ray actor by :func:`actor_class`) loads one
model from bytes the driver shipped, compiles it once, and scores (image,
targets) tasks with ``stage1.score_image`` and ``stage1.mat_record``, the
functions ``stage1_run.collect`` (``collect_gradients.py``) runs; it returns
the arrays of each ``.mat`` file and never writes one. :func:`stage2_file` is
the stage-2 Ray task of one file. :func:`pack`/:func:`unpack` move a model file or folder as bytes.
"""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time

import numpy as np

import aggregate
import common
from common import ToolError

def pack(path: str) -> tuple[str, bytes]:
    """(base name, bytes) of a model file, or of a folder as an uncompressed tar."""
    base = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname=base)
        return base + "/", buf.getvalue()
    with open(path, "rb") as fh:
        return base, fh.read()


def unpack(blob: tuple[str, bytes], folder: str) -> str:
    base, data = blob
    if base.endswith("/"):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(folder, filter="data")
        return os.path.join(folder, base[:-1])
    path = os.path.join(folder, base)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# --------------------------------------------------------------------------
# The worker (a Ray actor; the class is wrapped with ray.remote by _actor_class)
# --------------------------------------------------------------------------
class ModelWorker:
    """One worker slot: loads a model once and scores its (image, targets) tasks.

    The scoring is ``stage1.score_image``, as in ``collect_gradients.py``.
    Constructed cheaply; :meth:`setup` loads a model (and may later load the
    next model of the sweep into the same process, which saves starting
    Python and TensorFlow again), so that a model that fails to load is a
    value (one line naming its file), not a dead actor.
    """

    def __init__(self, gpu_growth: bool):
        self.gpu_growth = gpu_growth
        self.folder = ""
        self.error = ""
        self.estimator = None
        self._job_settings = None  # resume.py settings of the current job, once computed
        self.pool = None

    def pid(self) -> int:
        return os.getpid()

    def _where(self) -> dict:
        return {**_node_and_pid(), "host": platform.node()}

    def setup(self, settings, name: str, source: str, blob, images, ids) -> dict:
        """Load a model: ``settings`` the job's ``settings.Stage1Settings``; ``blob`` (base
        name, bytes) of ``source`` (the driver's path, for messages), or None; ``images``
        float32 [n, *input_shape] the job's images, test images ``ids``."""
        t0 = time.perf_counter()
        self._release()
        self.settings, self.name, self.source, self.blob, self.images, self.ids = (
            settings, name, source, blob, images, list(ids))
        self.error, self.estimator, self._job_settings = "", None, None
        if hasattr(self, "_defended_images"):
            del self._defended_images
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if self.gpu_growth:
            # Actors sharing a GPU must not each reserve all of its memory.
            os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
        try:
            self._load()
        except ToolError as err:
            self.error = str(err)
        except Exception as err:  # noqa: BLE001 - any failure to load fails this job only
            self.error = f"{self.source or self.name}: {type(err).__name__}: {err}"
        if self.error and self.folder:
            self.error = self.error.replace(self.path_on_worker, self.source)
        return {"ok": not self.error, "error": self.error.splitlines()[0] if self.error else "",
                "seconds": time.perf_counter() - t0, "versions": common.versions(),
                **self._where()}

    def _load(self) -> None:
        a = self.settings
        self.path_on_worker = ""
        if self.blob is not None:
            self.folder = tempfile.mkdtemp(prefix="clever-sweep-")
            self.path_on_worker = unpack(self.blob, self.folder)
        from randsphere import BallSampler

        self.sampler = BallSampler.create(a.sample_norm, a.radius, a.uniform_ball, a.data_range)
        common.set_seed(a.seed)  # before building, as stage1_run.collect: random weights agree
        if a.dataset == "imagenet":
            import imagenet_data

            model_path, weights = a.model_path, a.weights
            if self.path_on_worker:   # the shipped copy of the model file or weights file
                if a.model_path:
                    model_path = self.path_on_worker
                else:
                    weights = self.path_on_worker
            model = imagenet_data.stage1_model(
                model_name=a.model_name, weights=weights, model_path=model_path,
                input_size=a.input_size, models_dir=a.models_dir)
        else:
            import models

            model = models.load_model(a.dataset, a.model_name, a.activation,
                                      model_path=self.path_on_worker or a.model_path,
                                      models_dir=a.models_dir)
        self.estimator = self._estimator(model)
        self.versions = common.versions()
        self.dim = int(np.prod(self.images.shape[1:]))
        self.pool = None

    def _estimator(self, model):
        """The estimator exactly as stage1_run.collect builds it (order-2 check included)."""
        import stage1
        from estimate_gradient_norm import GradientNormEstimator

        a = self.settings
        stage1.check_order2_model(a, model, self.source or self.name)
        return GradientNormEstimator(model, self.images.shape[1:], a.batch_size,
                                     **stage1.estimator_options(a, GradientNormEstimator))

    def _defended(self) -> np.ndarray | None:
        """T(x0) of the job's images with --transform (the defended classifier), else None."""
        if not hasattr(self, "_defended_images"):
            self._defended_images = None
            if self.settings.transform:
                import stage1

                self._defended_images = stage1.defended_points(
                    self.settings.transform, self.images, self.ids, self.settings.seed,
                    self.settings.data_range)
        return self._defended_images

    def plan(self) -> dict:
        """Logits [n, K] at the job's clean images (what target selection needs)."""
        if self.error or self.estimator is None:
            return {"ok": False, "error": self.error or "the model is not loaded", **self._where()}
        t0 = time.perf_counter()
        defended = self._defended()
        logits = self.estimator.logits(self.images if defended is None else defended)
        return {"ok": True, "logits": np.asarray(logits), "settings": self._settings(),
                "seconds": time.perf_counter() - t0, **self._where()}

    def _settings(self) -> dict:
        """What every file of the job records and the driver checks on resume (resume.py);
        computed once per job (the model digest hashes every weight)."""
        if self._job_settings is None:
            import converge
            import stage1

            self._job_settings = stage1.run_settings(
                self.settings, self.estimator.model, self.name, self.sampler.radius,
                converge.rule_from_settings(self.settings))
        return self._job_settings

    def score(self, pos: int, task, pending: list) -> dict:
        """Score one image for its pending targets; returns the .mat records (path, keys)."""
        import stage1

        t0 = time.perf_counter()
        a = self.settings
        if a.sampler == "shm" and self.pool is None:
            from randsphere import SamplerPool

            self.pool = SamplerPool(self.sampler, self.images.shape[1:], a.batch_size,
                                    a.nthreads, a.transform or None, clip=a.data_range)
        compute = [0.0]
        first = [None]

        def on_iteration(st):
            compute[0] += st.seconds
            if first[0] is None:   # the first call of a fresh actor traces the function
                first[0] = st.seconds

        targets = [t for t, _ in pending]
        defended = self._defended()
        if defended is not None:
            task.evaluated = defended[pos]  # g(x0) and its gradient at T(x0), as the CLI
        # Samples around the untransformed x0 (task.image), exactly as stage1_run.collect.
        import converge

        # --converge: a stopped image frees this worker for the next task at once.
        rule = converge.rule_from_settings(a)
        result = stage1.score_image(self.estimator, self.sampler, self.pool, task, targets,
                                    task.image, nsamps=a.Nsamps, niters=a.Niters, seed=a.seed,
                                    order=a.order, on_iteration=on_iteration,
                                    stop_rule=converge.make_stop_rule(rule) if rule else None,
                                    check_every=rule.check_every if rule else None)
        import resume

        extra = {**converge.provenance(rule, result.niters_used, a.Niters, result.checks),
                 resume.SETTINGS_KEY: json.dumps(self._settings())}
        records = []
        for k, (target, path) in enumerate(pending):
            grad_x0 = None if result.grad_x0_norms is None else result.grad_x0_norms[k]
            records.append((path, stage1.mat_record(
                a, task, target, result.results[k], path, model_name=self.name, dim=self.dim,
                radius=self.sampler.radius, versions=self.versions, grad_x0_norm=grad_x0,
                extra=extra)))
        return {"records": records, "seconds": time.perf_counter() - t0,
                "compute_seconds": compute[0], "first_iteration_seconds": first[0] or 0.0,
                "iterations": result.niters_used, **self._where()}

    def _release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""
        self.estimator = None

    def close(self) -> None:
        """Release the sampling pool and the model's temporary copy, then end the actor."""
        import ray

        self._release()
        ray.actor.exit_actor()


def _node_and_pid() -> dict:
    """Where a Ray task or actor method runs: its node id and process id."""
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def actor_class(ray):
    """ModelWorker as a Ray actor class; ``pid`` answers even while a task runs.

    No automatic restarts or retries: the driver resubmits the task of a dead
    actor itself, so that it knows what was lost and writes every file once.
    """
    class Worker(ModelWorker):
        @ray.method(concurrency_group="control")
        def pid(self) -> int:
            return os.getpid()

    Worker.__name__ = Worker.__qualname__ = "ModelWorker"
    return ray.remote(concurrency_groups={"control": 1}, max_restarts=0,
                      max_task_retries=0)(Worker)


def stage2_file(name: str, data: bytes, method: str, shape_reg: float,
                level: float = 0.0) -> dict:
    """Stage 2 of one file (a Ray CPU task): stage 2's fit and bounds per bound norm.

    ``data``: the .mat file's bytes (no shared file system). ``level``: sweep
    --interval (0: none): each norm also gets ``bound_lo``, ``bound_hi``,
    ``bound_uncapped_lo``, ``bound_uncapped_hi``, ``estimate_lo``,
    ``estimate_hi`` (docs/intervals.md). Returns a JSON-ready record, or
    ``{"error": message}``.
    """
    import interval
    from stage2_files import load_stage1_file
    from weibull_fit import fit_reverse_weibull

    t0 = time.perf_counter()
    where = _node_and_pid()
    folder = tempfile.mkdtemp(prefix="clever-sweep-s2-")
    try:
        path = os.path.join(folder, os.path.basename(name))
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            f = load_stage1_file(path)
        except ToolError as err:
            return {"error": str(err).replace(path, name), **where}
        norms = {}
        for norm, samples in f.maxima.items():
            fit = fit_reverse_weibull(samples, method, shape_reg)
            b = aggregate.file_bound(f.order, f.g_x0, fit.estimate, f.radius, f.sample_norm,
                                     norm, f.dim, f.grad_norm)
            norms[norm.label] = {"key": f.keys[norm], "estimate": fit.estimate,
                                 "shape": fit.shape, "loc": fit.loc, "scale": fit.scale,
                                 "ks": fit.ks, "pval": fit.pval, "status": fit.status.value,
                                 "bound": b.bound, "bound_uncapped": b.uncapped, "cap": b.cap}
            if level > 0:
                iv = interval.lipschitz_interval(samples, fit, level, method=method,
                                                 shape_reg=shape_reg)
                lo, hi = interval.bound_ends(f.order, f.g_x0, iv.lo, iv.hi, b.cap,
                                             f.grad_norm)
                ulo, uhi = interval.bound_ends(f.order, f.g_x0, iv.lo, iv.hi, None,
                                               f.grad_norm)
                norms[norm.label].update(bound_lo=lo, bound_hi=hi, bound_uncapped_lo=ulo,
                                         bound_uncapped_hi=uhi, estimate_lo=iv.lo,
                                         estimate_hi=iv.hi)
        return {"path": name, "id": f.img_id, "true_label": f.true_label,
                "target_label": f.target_label, "info": f.info, "order": f.order,
                "g_x0": f.g_x0, "radius": f.radius,
                "data_range": None if f.data_range is None else list(f.data_range),
                "norms": norms, "seconds": time.perf_counter() - t0, **where}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def attack_task(blob, dataset: str, images: dict, pairs: list, untargeted_ids: list, settings, cached: dict,
                attack: str) -> dict:
    """One attack of ``reproduce_tables.py --address`` (a Ray CPU task).

    ``blob``: the model file's :func:`pack` bytes, a model of ``dataset``; the
    other arguments are ``paper_attacks.run_attacks``'. Returns ``{"records",
    "computed", node, pid}`` (records of that attack, cached ones included) or
    ``{"error": line}``.
    """
    import models
    import paper_attacks
    from paper_tables import Attack

    where = _node_and_pid()
    folder = tempfile.mkdtemp(prefix="clever-attack-")
    try:
        try:
            model = models.load_model(dataset, model_path=unpack(blob, folder))
        except ToolError as err:
            return {"error": str(err).splitlines()[0], **where}
        records, computed = paper_attacks.run_attacks(
            model, images, pairs, untargeted_ids, settings, cached, lambda *_: None,
            only=(Attack(attack),))
        return {"records": records, "computed": computed, **where}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
