#!/usr/bin/env python3
"""CLEVER over a model zoo on a Ray cluster: stage 1 and stage 2 in one command.

    python sweep.py -d digits --models normal,distilled,brelu,2-layer -n 100 \\
        --targets top2,random,least -N 1024 -i 500 -s lipschitz_mat --out results/sweep

Every flag of ``collect_gradients.py`` (data, images, targets, sampling,
output) is accepted with the same name and meaning; ``--models`` replaces
``--model_name``/``--model_path`` and takes a comma-separated list of zoo
names, model names under ``--models_dir`` and model files (``.keras``,
``.h5``, SavedModel folders, ``.pb``). ``--spec sweep.toml`` lists jobs that
differ in data set, model or flags.

How the work is spread (one core, two drivers: the per-image work is
``stage1.score_image``, the same function ``collect_gradients.py`` runs):

* One Ray actor per worker slot loads and compiles one model, then scores a
  stream of (image, targets) tasks of that model. The driver hands a task to
  an actor when it is free, so a slow image never idles the other actors;
  an actor whose model has no work left is retired and its slot goes to the
  next model.
* Planning (which files are missing) needs the targets, i.e. the logits at
  the clean images. The first actor of a model computes them on the worker
  (the same device and the same batches as ``collect_gradients.py``, so
  target choices and g(x0) are bit-identical); the driver then drops the
  (image, target) pairs whose file exists before any scoring task is
  scheduled. The driver needs no accelerator.
* No shared file system: the driver sends the model file's bytes and the
  images through the object store; workers return the arrays of each
  ``.mat`` file and the DRIVER writes them atomically into
  ``<save>/<dataset>_<model>/`` exactly as ``collect_gradients.py`` does.
* A worker that dies has its task resubmitted to another actor (up to
  ``--max_retries`` times); a file is written once, by the driver, when its
  result arrives. A model that fails to load fails its own job with one line.
  A killed driver leaves only complete files; rerunning resumes.
* Stage 2 runs as one Ray CPU task per file (the fit of ``clever.py``); the
  driver writes ``--out``: summary.csv, summary.md, records.json,
  records.csv and provenance.json. Every record carries its job's label
  (``sweep_jobs.job_labels``); the summary's rows are per job, info and norm,
  aggregated by ``aggregate.py`` as ``clever.py`` does (``sweep_summary.py``,
  docs/sweeps.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Sequence

import numpy as np

import common
import resume
import stage1
from common import ToolError
from sweep_jobs import MODEL_FLAGS, Job, Task, build_jobs, collect_args, collect_args_record
from sweep_summary import summarize, write_outputs
from sweep_worker import actor_class, pack, stage2_file

log = logging.getLogger("clever.sweep")

PROG = "sweep.py"
#: Ray namespace of the sweep's named actors (clever-sweep-<driver pid>-<n>).
NAMESPACE = "clever-sweep"
ROOT = os.path.dirname(os.path.abspath(__file__))

#: What --ship_code never uploads to the cluster (data, models and results travel as bytes).
_CODE_EXCLUDES = [".venv", ".git", "data", "models", "lipschitz_mat", "results", "logs", "plots",
                  "__pycache__", "*.pyc", ".pytest_cache", "*.mat", "*.keras", "*.h5", "*.pb"]


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Every other flag is a flag of collect_gradients.py with the same meaning "
               "(-d, -n, -f, --ids, --targets, --target_type, -N, -i, --sample_norm, --radius, "
               "--order, --seed, -s/--save, --overwrite, --models_dir, --data_dir, ...): "
               "see python collect_gradients.py --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--models", default="",
                   help="comma-separated models: zoo names (normal, distilled, brelu, 2-layer, "
                        "ImageNet names), names under --models_dir, or model files")
    g.add_argument("--spec", default="",
                   help="TOML file of jobs: [defaults] and [[job]] tables whose keys are "
                        "collect_gradients.py flags (long names) plus 'models'")
    g.add_argument("--out", default="results/sweep", help="folder of the summaries")
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default="",
                   help="'' starts Ray on this machine; 'auto' or ray://HOST:PORT (or HOST:PORT) "
                        "joins a running cluster")
    g.add_argument("--workers", type=int, default=0,
                   help="model actors at once (0: the cluster's GPUs, else its CPUs / 2)")
    g.add_argument("--gpus_per_worker", type=float, default=None,
                   help="GPUs per actor (default 1 where the cluster has GPUs, else 0; "
                        "fractions share a GPU)")
    g.add_argument("--cpus_per_worker", type=float, default=1.0, help="CPUs reserved per actor")
    g.add_argument("--num_cpus", type=int, default=0,
                   help="CPUs of a local Ray (--address ''; 0: all of this machine's)")
    g.add_argument("--max_retries", type=int, default=3,
                   help="times a task is resubmitted after its worker process died")
    g.add_argument("--ship_code", choices=("auto", "yes", "no"), default="auto",
                   help="upload this folder's code to the workers (auto: when joining a cluster)")
    g.add_argument("--no_stage2", action="store_true", help="stage 1 only")
    g.add_argument("--shape_reg", type=float, default=0.01, help="stage 2: as clever.py")
    g.add_argument("--method", choices=("mle_reg", "mle", "maxsamp"), default="mle_reg",
                   help="stage 2: as clever.py")
    g.add_argument("--interval", type=float, default=0.9, metavar="LEVEL",
                   help="stage 2: as clever.py (each bound's range for another seed, "
                        "docs/intervals.md; 0: none)")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        _sweep_parser().parse_args(["--help"])
    args, rest = _sweep_parser().parse_known_args(argv)
    for flag in MODEL_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ToolError(f"{flag}: sweep.py takes its models from --models (or --spec)")
    args.shared = rest
    # The shared flags are checked once up front: a bad flag fails the sweep in a second.
    args.base = collect_args(rest, "arguments")
    if not args.models and not args.spec:
        raise ToolError("--models: give at least one model (or a --spec file)")
    if args.workers < 0:
        raise ToolError(f"--workers must be positive, got {args.workers}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise ToolError(f"--gpus_per_worker must be non-negative, got {args.gpus_per_worker}")
    if args.cpus_per_worker < 0:
        raise ToolError(f"--cpus_per_worker must be non-negative, got {args.cpus_per_worker}")
    common.check_positive("--max_retries", args.max_retries, allow_zero=True)
    common.check_positive("--shape_reg", args.shape_reg, allow_zero=True)
    if not 0.0 <= getattr(args, "interval", 0.0) < 1.0:
        raise ToolError(f"--interval {args.interval}: the level must be in [0, 1) (0: none)")
    if args.spec and not os.path.isfile(args.spec):
        raise ToolError(f"--spec: {args.spec} does not exist")
    if not (args.address in ("", "auto") or args.address.startswith("ray://")
            or ":" in args.address):
        raise ToolError(f"--address: {args.address!r} is not '', 'auto', ray://HOST:PORT "
                        "or HOST:PORT")
    return args


# --------------------------------------------------------------------------
# Ray plumbing
# --------------------------------------------------------------------------
def _runtime_env(args) -> dict:
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}}
    ship = args.ship_code == "yes" or (args.ship_code == "auto" and args.address != "")
    if ship:
        env["working_dir"] = ROOT
        env["excludes"] = list(_CODE_EXCLUDES)
    return env


def connect(args) -> bool:
    """Connect to (or start) Ray; returns whether this call started the connection."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "runtime_env": _runtime_env(args),
              "logging_level": logging.WARNING, "configure_logging": True}
    if args.address == "":
        # "local": without an address ray.init joins the latest instance that `ray start`
        # left on this machine, and then refuses num_cpus; '' means a Ray of our own.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = args.num_cpus or os.cpu_count() or 1
    else:
        kwargs["address"] = args.address
        kwargs.pop("include_dashboard")
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ToolError(f"--address {args.address or repr('')}: cannot start or join Ray "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") \
            from None
    return True


def _cluster_info() -> dict:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return {"nodes": len(nodes), "cpus": float(res.get("CPU", 0)), "gpus": float(res.get("GPU", 0)),
            "node_ids": [n["NodeID"] for n in nodes],
            "hosts": sorted({n.get("NodeManagerHostname", "") for n in nodes})}


def default_workers(cluster: dict, gpus_per_worker: float) -> int:
    """As many actors as GPUs (GPU clusters) or half the CPUs, at least 1."""
    if gpus_per_worker > 0 and cluster["gpus"] > 0:
        return max(1, int(cluster["gpus"] // gpus_per_worker))
    return max(1, int(cluster["cpus"] // 2))


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------
class _Slot:
    """A live actor, the job it serves and what it is doing."""

    def __init__(self, serial: int, handle, name: str):
        self.serial, self.handle, self.name = serial, handle, name
        self.job: Job | None = None
        self.ready = False       # the job's model is loaded
        self.busy = False        # a scoring call is in flight
        self.node = ""

class Sweep:
    """The scheduling loop: actors per model, tasks streamed to free actors, files written here."""

    def __init__(self, args, jobs: list[Job]):
        import ray

        self.ray = ray
        self.args = args
        self.jobs = jobs
        self.cluster = _cluster_info()
        self.gpus = (args.gpus_per_worker if args.gpus_per_worker is not None
                     else (1.0 if self.cluster["gpus"] > 0 else 0.0))
        self.workers = args.workers or default_workers(self.cluster, self.gpus)
        self.slots: list[_Slot] = []
        self.serial = 0
        self.inflight: dict = {}     # ObjectRef -> (kind, slot or None, payload, t_submit)
        self.task_log: list[dict] = []
        self.worker_versions: dict = {}
        self.stage2: list[dict] = []
        self.stage2_errors: list[dict] = []
        self.deaths = 0
        self.written: list[str] = []
        self.capped: dict = {}       # job -> {file: order-2 batches whose power iteration hit the cap}
        self.bar = None
        self.actor_cls = actor_class(ray)
        self.stage2_fn = ray.remote(num_cpus=1, max_retries=args.max_retries)(stage2_file)
        self.sched_seconds = 0.0

    # -- actors --------------------------------------------------------------
    def _start_actor(self) -> _Slot:
        self.serial += 1
        name = f"clever-sweep-{os.getpid()}-{self.serial}"
        # A fractional GPU is shared: memory growth instead of one actor taking all of it.
        handle = self.actor_cls.options(
            name=name, num_cpus=self.args.cpus_per_worker, num_gpus=self.gpus,
        ).remote(0 < self.gpus < 1)
        slot = _Slot(self.serial, handle, name)
        self.slots.append(slot)
        return slot

    def _assign(self, slot: _Slot, job: Job) -> None:
        """Load ``job``'s model on ``slot`` (a new actor, or one whose model has no work left)."""
        if job.blob_ref is None:
            self._prepare(job)
        if slot.job is not None:
            slot.job.actors -= 1
        slot.job, slot.ready, slot.busy = job, False, False
        job.actors += 1
        self._submit("setup", slot, slot.handle.setup.remote(
            job.args, job.name, job.source, job.blob_ref, job.images_ref, job.ids), None)
        if job.state == "new":
            job.state = "planning"
            self._submit("plan", slot, slot.handle.plan.remote(), None)

    def _retire(self, slot: _Slot, kill: bool = True) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
            if slot.job is not None:
                slot.job.actors -= 1
            if kill:
                # Idle actors only: close() runs next, cleans up and ends the process.
                try:
                    slot.handle.close.remote()
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def _prepare(self, job: Job) -> None:
        """Images and model bytes of a job into the object store (once per job)."""
        import collect_gradients

        a = job.args
        if a.dataset == "imagenet":
            import setup_imagenet

            common.set_seed(a.seed)
            _, data, job.label_offset = setup_imagenet.load_for_stage1(a)
        else:
            import models

            data = models.load_dataset(a.dataset, a.data_dir)
        job.test_data = common.scale_to_range(data.test_data, a.data_range)
        job.test_labels = data.test_labels
        job.ids, job.user_targets = collect_gradients.image_ids(a, len(job.test_data))
        images = np.ascontiguousarray(job.test_data[job.ids], dtype=np.float32)
        job.images_ref = self.ray.put(images)
        job.blob_ref = self.ray.put(pack(job.source)) if job.source else self.ray.put(None)

    # -- submission ------------------------------------------------------------
    def _submit(self, kind: str, slot, ref, payload) -> None:
        self.inflight[ref] = (kind, slot, payload, time.perf_counter())

    def _dispatch(self) -> None:
        """Queued tasks to ready idle actors; actors without work to other models or retired."""
        for slot in list(self.slots):
            job = slot.job
            if not slot.ready or slot.busy:
                continue
            if job.state == "running" and job.queue:
                t = job.queue.popleft()
                slot.busy = True
                job.inflight += 1
                self._submit("score", slot, slot.handle.score.remote(t.pos, t.task, t.pending), t)
            elif job.state != "planning":
                nxt = self._next_job(moving=slot)
                if nxt is not None:
                    self._assign(slot, nxt)
                elif not any(j.state == "planning" for j in self.jobs):
                    # Kept while a model is being planned: its work may need this actor.
                    self._retire(slot)
        while len(self.slots) < self.workers:
            job = self._next_job()
            if job is None:
                break
            slot = self._start_actor()
            try:
                self._assign(slot, job)
            except ToolError as err:
                self._fail_job(job, str(err))

    def _next_job(self, moving: _Slot | None = None) -> Job | None:
        """The job a free actor should load: a model not started yet, else queued work
        that the job's own actors will not finish before another actor could load it."""
        for job in self.jobs:
            if job.state == "new":
                return job
        for job in self.jobs:
            if job.state == "running" and job.queue and job.actors == 0:
                return job   # its actors died or were retired: it needs one whatever it costs
        best, best_gain = None, 0.0
        for job in self.jobs:
            if job.state != "running" or job is (moving.job if moving else None):
                continue
            waiting = self._waiting_actors(job)
            spare = len(job.queue) - waiting
            if spare <= 0:
                continue
            # Seconds of queued work per actor now, against the time a new actor needs
            # before it is useful (load the model, trace the function). Before the job's
            # first task has finished there is no estimate: wait for it.
            per_task, trace = self._task_seconds(job)
            if per_task is None:
                continue
            gain = len(job.queue) * per_task / max(1, job.actors) - self._setup_seconds() - trace
            if gain > best_gain:
                best, best_gain = job, gain
        return best

    def _waiting_actors(self, job: Job) -> int:
        return sum(1 for s in self.slots if s.job is job and not s.busy)

    def _task_seconds(self, job: Job) -> tuple[float | None, float]:
        """(steady seconds per task, seconds of tracing) of the job's finished tasks.

        The first iteration of an actor's first task includes tracing the compiled
        function: the steady time per task leaves it out (scaled to all iterations).
        """
        steady, trace = [], [0.0]
        for t in self.task_log:
            if t["kind"] != "score" or t["job"] != job.label:
                continue
            n = max(1, t.get("iterations", 1))
            rest = t["compute_seconds"] - t["first_iteration_seconds"]
            per_iter = rest / (n - 1) if n > 1 else t["compute_seconds"]
            steady.append(t["worker_seconds"] - t["first_iteration_seconds"] + per_iter)
            trace.append(t["first_iteration_seconds"] - per_iter)
        return (float(np.median(steady)) if steady else None), max(trace)

    def _setup_seconds(self) -> float:
        times = [t["worker_seconds"] for t in self.task_log if t["kind"] == "setup"]
        return float(np.median(times)) if times else 0.0

    # -- results ---------------------------------------------------------------
    def _handle(self, ref) -> None:
        kind, slot, payload, t_submit = self.inflight.pop(ref)
        exc = self.ray.exceptions
        try:
            out = self.ray.get(ref)
        except (exc.RayActorError, exc.ActorDiedError, exc.ActorUnavailableError) as err:
            self._actor_died(kind, slot, payload, err)
            return
        except exc.RayTaskError as err:
            self._task_error(kind, slot, payload, err)
            return
        except exc.RayError as err:   # a stage-2 task's worker crashed beyond its retries
            if kind != "stage2":
                raise
            self._stage2_done(payload, {"error": f"{type(err).__name__}"})
            return
        if kind == "setup":
            self.worker_versions.setdefault(out["host"], out["versions"])
            self._log_task("setup", slot.job, out, time.perf_counter() - t_submit)
            slot.ready, slot.node = True, out["node"]
            if not out["ok"]:
                # The job fails; the actor (Python and TensorFlow started) serves the next.
                self._fail_job(slot.job, out["error"])
        elif kind == "plan":
            if out["ok"]:
                self._log_task("plan", slot.job, out, time.perf_counter() - t_submit)
                self._plan(slot.job, out["logits"], out["settings"])
        elif kind == "score":
            self._scored(slot, payload, out, time.perf_counter() - t_submit)
        elif kind == "stage2":
            self._stage2_done(payload, out)

    def _actor_died(self, kind, slot, payload, err) -> None:
        if kind == "stage2":
            self._stage2_done(payload, {"error": f"its worker died ({type(err).__name__})"})
            return
        job = slot.job
        if slot in self.slots:
            self.deaths += 1
            log.warning("a worker of %s died (%s); its work goes to another worker",
                        job.label, type(err).__name__)
            self._retire(slot, kill=False)
        if kind == "score":
            job.inflight -= 1
            payload.attempt += 1
            if payload.attempt > self.args.max_retries:
                self._fail_task(payload, f"its worker died {payload.attempt} times")
            else:
                job.queue.appendleft(payload)
        elif kind == "plan" and job.state == "planning":
            job.setup_failures += 1
            if job.setup_failures > self.args.max_retries:
                self._fail_job(job, f"{job.token}: the worker died while loading the model "
                                    f"{job.setup_failures} times")
            else:
                job.state = "new"   # plan again on a new actor

    def _task_error(self, kind, slot, payload, err) -> None:
        cause = getattr(err, "cause", None) or err
        text = str(cause).strip().splitlines()
        message = f"{type(cause).__name__}: {text[-1] if text else ''}"
        if kind == "score":
            slot.busy = False
            slot.job.inflight -= 1
            self._fail_task(payload, message)
        elif kind == "stage2":
            self._stage2_done(payload, {"error": message})
        else:
            slot.ready = True
            self._fail_job(slot.job, f"{slot.job.token}: {message}")

    def _fail_task(self, t: Task, message: str) -> None:
        t.job.n_failed += len(t.pending)
        log.error("%s: image %d failed (%s)", t.job.label, t.task.img_id, message)
        if self.bar is not None:
            self.bar.update(1)
        self._check_done(t.job)

    def _fail_job(self, job: Job, message: str) -> None:
        if job.state == "failed":
            return
        job.state, job.error = "failed", message
        job.n_failed += sum(len(t.pending) for t in job.queue) or (0 if job.files else 1)
        if self.bar is not None:
            self.bar.update(len(job.queue))
        job.queue.clear()
        print(f"{PROG}: error: {message.splitlines()[0]}", file=sys.stderr, flush=True)

    def _plan(self, job: Job, logits: np.ndarray, settings: dict) -> None:
        """Targets from the worker's logits; existing files are dropped here, before any task."""
        import utils

        a = job.args
        tasks = utils.generate_data(job.test_data, job.test_labels, logits, job.ids, a.kinds,
                                    a.seed, job.user_targets,
                                    excluded=(0,) if job.label_offset else (),
                                    label_offset=job.label_offset)
        for task in tasks:
            if not task.correct:
                log.info("%s: image %d is misclassified (label %d, predicted %d): skipped",
                         job.label, task.img_id, task.true_label, task.predicted)
        # Before any of the job's tasks: a file made with other settings stops the sweep
        # with one line (resume.py), nothing of the job's changed.
        check = resume.ResumeCheck(settings)
        work = stage1.plan_image_files(a, tasks, job.out_dir, check=check)
        if check.notice():
            log.warning("%s: %s", job.label, check.notice())
        os.makedirs(job.out_dir, exist_ok=True)
        if common.remove_stale_temp_files(job.out_dir):
            log.warning("removed temporary files of an earlier run that was killed in %s",
                        job.out_dir)
        pos = {img_id: k for k, img_id in enumerate(job.ids)}
        for task in tasks:
            for target in task.targets:
                path = os.path.join(job.out_dir, common.MatName(
                    a.Nsamps, a.Niters, task.img_id, task.true_label, target.label, target.info,
                    a.activation, a.order).filename())
                job.files.append((task, target, path))
        pending = sum(len(p) for _, p in work)
        job.n_skipped = len(job.files) - pending
        if job.n_skipped:
            log.warning("%s: %d result files already exist in %s and are kept (resume)",
                        job.label, job.n_skipped, job.out_dir)
        for task, plist in work:
            job.queue.append(Task(job, pos[task.img_id], task, list(plist)))
        job.state = "running"
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(job.queue)
            self.bar.refresh()
        self._check_done(job)

    def _scored(self, slot: _Slot, t: Task, out: dict, wall: float) -> None:
        slot.busy = False
        t.job.inflight -= 1
        self._dispatch()          # the actor gets its next task before the files are written
        w0 = time.perf_counter()
        paths = []
        for path, record in out["records"]:
            common.atomic_savemat(path, record)
            paths.append(path)
            if "power_capped_batches" in record:
                self.capped.setdefault(t.job, {})[path] = int(record["power_capped_batches"])
        self.written += paths
        t.job.n_written += len(paths)
        write = time.perf_counter() - w0
        self.task_log.append({"kind": "score", "job": t.job.label, "image": t.task.img_id,
                              "targets": [tg.label for tg, _ in t.pending], "files": paths,
                              "node": out["node"], "pid": out["pid"], "host": out["host"],
                              "attempt": t.attempt, "wall_seconds": wall,
                              "worker_seconds": out["seconds"],
                              "compute_seconds": out["compute_seconds"],
                              "first_iteration_seconds": out["first_iteration_seconds"],
                              "iterations": out["iterations"],
                              "write_seconds": write})
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()
        self._check_done(t.job)

    def _check_done(self, job: Job) -> None:
        if job.state != "running" or job.queue or job.inflight:
            return
        job.state = "done"
        if self.args.no_stage2:
            return
        for task, target, path in job.files:
            if not os.path.exists(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            ref = self.stage2_fn.remote(path, data, self.args.method, self.args.shape_reg,
                                        getattr(self.args, "interval", 0.0))
            self._submit("stage2", None, ref, (job, path))

    def _stage2_done(self, payload, out: dict) -> None:
        job, path = payload
        if "error" in out:
            self.stage2_errors.append({"job": job.label, "model": job.name, "path": path,
                                       "error": out["error"]})
            log.error("%s: stage 2: %s", path, out["error"])
        else:
            out.update(job=job.label, job_settings=job.label_settings, model=job.name,
                       dataset=job.args.dataset)
            self.stage2.append(out)
        self.task_log.append({"kind": "stage2", "job": job.label, "files": [path],
                              "node": out.get("node", ""), "pid": out.get("pid", 0),
                              "worker_seconds": out.get("seconds", 0.0)})

    def _log_task(self, kind: str, job: Job, out: dict, wall: float) -> None:
        self.task_log.append({"kind": kind, "job": job.label, "node": out.get("node", ""),
                              "pid": out.get("pid", 0), "host": out.get("host", ""),
                              "wall_seconds": wall, "worker_seconds": out.get("seconds", 0.0)})

    def _postfix(self) -> None:
        busy = [s for s in self.slots if s.busy]
        self.bar.set_postfix_str(f"{len(busy)}/{self.workers} workers busy on "
                                 f"{len({s.node for s in busy})}/{self.cluster['nodes']} nodes")

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="task", disable=self.args.base.no_progress,
                        file=sys.stderr, dynamic_ncols=True)
        try:
            self._dispatch()
            while self.inflight or any(j.state in ("new", "planning", "running")
                                       for j in self.jobs):
                if not self.inflight:
                    # Nothing in flight but work left: an actor must be started.
                    self._dispatch()
                    if not self.inflight:
                        raise RuntimeError("sweep: no progress possible (scheduler bug)")
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    self._handle(ref)
                self._dispatch()
        finally:
            self.bar.close()
            for slot in list(self.slots):
                self._retire(slot)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    common.setup_logging(args.base.verbose)
    jobs = build_jobs(args)
    for job in jobs:
        if job.error:
            print(f"{PROG}: error: {job.error.splitlines()[0]}", file=sys.stderr, flush=True)
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) \
        if threading_main() else None
    own = False
    try:
        own = connect(args)
        import ray

        sweep = Sweep(args, jobs)
        log.info("cluster: %d nodes, %g CPUs, %g GPUs; %d workers of %g GPUs",
                 sweep.cluster["nodes"], sweep.cluster["cpus"], sweep.cluster["gpus"],
                 sweep.workers, sweep.gpus)
        sweep.run()
        written = len(sweep.written)
        skipped = sum(j.n_skipped for j in jobs)
        failed = sum(j.n_failed for j in jobs) + sum(1 for j in jobs if j.error and not j.files
                                                     and j.n_failed == 0)
        records = sorted(sweep.stage2, key=lambda r: (r["job"], r["info"], r["id"], r["path"]))
        rows = summarize(records)
        provenance = common.provenance(
            {k: v for k, v in vars(args).items() if k != "base"},
            ray_version=ray.__version__, cluster=sweep.cluster, workers=sweep.workers,
            gpus_per_worker=sweep.gpus, worker_versions=sweep.worker_versions,
            jobs=[{"job": j.label, "label_settings": j.label_settings, "model": j.name,
                   "token": j.token, "source": j.source, "out_dir": j.out_dir,
                   "state": j.state, "error": j.error, "written": j.n_written,
                   "skipped": j.n_skipped, "failed": j.n_failed,
                   "args": collect_args_record(j.args)} for j in jobs],
            worker_deaths=sweep.deaths, tasks=sweep.task_log,
            stage2_errors=sweep.stage2_errors, seconds=time.time() - started)
        write_outputs(args.out, rows, records, provenance)
        for job, capped in sweep.capped.items():
            warning = stage1.power_cap_warning(capped, job.args.power_iters)
            if warning:
                log.warning("%s: %s", job.label, warning)
        if rows:
            print(f"[SWEEP] summary: {os.path.join(args.out, 'summary.csv')}", flush=True)
        print(f"sweep: {written} files written, {skipped} skipped, {failed} failed", flush=True)
        ok = failed == 0 and not any(j.error for j in jobs) and not sweep.stage2_errors
        return 0 if ok else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if own:
            import ray

            ray.shutdown()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args, prog=PROG))
