"""The engine of ``sweep.py``: its options as a value, the Ray driver, :func:`run`.

:class:`SweepOptions` holds a sweep's own options and the stage-1 flags its
jobs share (``settings.Stage1Settings`` keywords); :func:`run` is the whole
sweep, called by ``sweep.py`` and ``reproduce_tables.py --address``. The
scheduling (actors per model, tasks streamed to free actors, files written by
the driver only) is :class:`Sweep`; the jobs are ``sweep_jobs.py``, the worker
side ``sweep_worker.py``, the summaries ``sweep_summary.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, TextIO

import numpy as np

import common
import resume
import stage1
from common import ToolError
from settings import Stage1Settings
from sweep_jobs import Job, Task, build_jobs, collect_args_record
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
#: Stage-1 settings that name the model: a sweep's models come from ``models`` / ``spec``.
MODEL_SETTINGS = ("model_name", "model_path")


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """A sweep's options (``sweep.py``'s flags by their long names) and ``stage1``, the
    stage-1 settings its jobs share (``Stage1Settings.from_kwargs`` keywords; a job's
    ``--spec`` table overrides them). ``base``: those shared settings, checked.

    Build with :meth:`create`, which checks everything once."""

    models: str = ""
    spec: str = ""
    out: str = "results/sweep"
    address: str = ""
    workers: int = 0
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    num_cpus: int = 0
    max_retries: int = 3
    ship_code: str = "auto"
    no_stage2: bool = False
    shape_reg: float = 0.01
    method: str = "mle_reg"
    interval: float = 0.9           # stage 2 --interval LEVEL (docs/intervals.md); 0: none
    stage1: Mapping[str, Any] = field(default_factory=dict)
    base: Stage1Settings | None = None

    @classmethod
    def create(cls, *, stage1: Mapping[str, Any] | None = None, **options: Any) -> "SweepOptions":
        """Options from keywords; ToolError (one line naming the flag) when one is bad."""
        shared = dict(stage1 or {})
        for key in MODEL_SETTINGS:
            if key in shared:
                raise ToolError(f"--{key}: sweep.py takes its models from --models (or --spec)")
        unknown = [k for k in options if k not in {f.name for f in dataclasses.fields(cls)}
                   or k in ("stage1", "base")]
        if unknown:
            raise ToolError(f"--{unknown[0]}: not an option of sweep.py")
        # The shared flags are checked once up front: a bad flag fails the sweep in a second.
        base = Stage1Settings.from_kwargs(**shared)
        return cls(stage1=shared, base=base, **options)

    def __post_init__(self):
        if self.base is None:
            raise ValueError("SweepOptions: build with SweepOptions.create")
        if not self.models and not self.spec:
            raise ToolError("--models: give at least one model (or a --spec file)")
        if self.workers < 0:
            raise ToolError(f"--workers must be positive, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ToolError(f"--gpus_per_worker must be non-negative, got {self.gpus_per_worker}")
        if self.cpus_per_worker < 0:
            raise ToolError(f"--cpus_per_worker must be non-negative, got {self.cpus_per_worker}")
        common.check_positive("--max_retries", self.max_retries, allow_zero=True)
        common.check_positive("--shape_reg", self.shape_reg, allow_zero=True)
        if not 0.0 <= self.interval < 1.0:
            raise ToolError(f"--interval {self.interval}: the level must be in [0, 1) "
                            "(0: none)")
        if self.spec and not os.path.isfile(self.spec):
            raise ToolError(f"--spec: {self.spec} does not exist")
        if not (self.address in ("", "auto") or self.address.startswith("ray://")
                or ":" in self.address):
            raise ToolError(f"--address: {self.address!r} is not '', 'auto', ray://HOST:PORT "
                            "or HOST:PORT")
        if self.ship_code not in ("auto", "yes", "no"):
            raise ToolError(f"--ship_code: {self.ship_code!r} is not auto, yes or no")
        if self.method not in ("mle_reg", "mle", "maxsamp"):
            raise ToolError(f"--method: {self.method!r} is not mle_reg, mle or maxsamp")

    def record(self) -> dict:
        """The options as JSON values (the sweep's provenance)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base"}
        out["stage1"] = {k: common.jsonable(v) for k, v in self.stage1.items()}
        return out


# --------------------------------------------------------------------------
# Ray plumbing
# --------------------------------------------------------------------------
def _runtime_env(address: str, ship_code: str) -> dict:
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}}
    ship = ship_code == "yes" or (ship_code == "auto" and address != "")
    if ship:
        env["working_dir"] = ROOT
        env["excludes"] = list(_CODE_EXCLUDES)
    return env


def connect(options: "SweepOptions | None" = None, *, address: str | None = None,
            num_cpus: int | None = None, ship_code: str | None = None) -> bool:
    """Connect to (or start) Ray; returns whether this call started the connection.

    ``options``' ``address``, ``num_cpus`` and ``ship_code``, or those values given
    by keyword (``address`` '': a Ray of our own on this machine; 'auto',
    ray://HOST:PORT or HOST:PORT: join a cluster).
    """
    import ray

    if options is not None:
        address = options.address if address is None else address
        num_cpus = options.num_cpus if num_cpus is None else num_cpus
        ship_code = options.ship_code if ship_code is None else ship_code
    address, num_cpus, ship_code = address or "", num_cpus or 0, ship_code or "auto"
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "runtime_env": _runtime_env(address, ship_code),
              "logging_level": logging.WARNING, "configure_logging": True}
    if address == "":
        # "local": without an address ray.init joins the latest instance that `ray start`
        # left on this machine, and then refuses num_cpus; '' means a Ray of our own.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    else:
        kwargs["address"] = address
        kwargs.pop("include_dashboard")
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ToolError(f"--address {address or repr('')}: cannot start or join Ray "
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

    def __init__(self, options: "SweepOptions", jobs: list[Job]):
        import ray

        self.ray = ray
        self.options = options
        self.jobs = jobs
        self.cluster = _cluster_info()
        self.gpus = (options.gpus_per_worker if options.gpus_per_worker is not None
                     else (1.0 if self.cluster["gpus"] > 0 else 0.0))
        self.workers = options.workers or default_workers(self.cluster, self.gpus)
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
        self.stage2_fn = ray.remote(num_cpus=1, max_retries=options.max_retries)(stage2_file)
        self.sched_seconds = 0.0

    # -- actors --------------------------------------------------------------
    def _start_actor(self) -> _Slot:
        self.serial += 1
        name = f"clever-sweep-{os.getpid()}-{self.serial}"
        # A fractional GPU is shared: memory growth instead of one actor taking all of it.
        handle = self.actor_cls.options(
            name=name, num_cpus=self.options.cpus_per_worker, num_gpus=self.gpus,
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
            job.settings, job.name, job.source, job.blob_ref, job.images_ref, job.ids), None)
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
        a = job.settings
        if a.dataset == "imagenet":
            import imagenet_data

            common.set_seed(a.seed)
            _, data, job.label_offset = imagenet_data.load_for_stage1(
                **imagenet_data.settings_for_stage1(a))
        else:
            import models

            data = models.load_dataset(a.dataset, a.data_dir)
        job.test_data = common.scale_to_range(data.test_data, a.data_range)
        job.test_labels = data.test_labels
        job.ids, job.user_targets = stage1.image_ids(a, len(job.test_data))
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
            if payload.attempt > self.options.max_retries:
                self._fail_task(payload, f"its worker died {payload.attempt} times")
            else:
                job.queue.appendleft(payload)
        elif kind == "plan" and job.state == "planning":
            job.setup_failures += 1
            if job.setup_failures > self.options.max_retries:
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

        a = job.settings
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
        if self.options.no_stage2:
            return
        for task, target, path in job.files:
            if not os.path.exists(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            ref = self.stage2_fn.remote(path, data, self.options.method, self.options.shape_reg,
                                        self.options.interval)
            self._submit("stage2", None, ref, (job, path))

    def _stage2_done(self, payload, out: dict) -> None:
        job, path = payload
        if "error" in out:
            self.stage2_errors.append({"job": job.label, "model": job.name, "path": path,
                                       "error": out["error"]})
            log.error("%s: stage 2: %s", path, out["error"])
        else:
            out.update(job=job.label, job_settings=job.label_settings, model=job.name,
                       dataset=job.settings.dataset)
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

        self.bar = tqdm(total=0, unit="task", disable=self.options.base.no_progress,
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


def run(options: SweepOptions, stream: TextIO | None = None) -> int:
    """The sweep of ``options``: stage 1 of every job on Ray, then stage 2 (unless
    ``no_stage2``) and the summaries in ``options.out``. The two closing lines
    (``[SWEEP] summary: ...``, ``sweep: N files written, ...``) go to ``stream``
    (default stdout); a job's error is one line on stderr. Returns 0, or 1 when a
    job, file or fit failed. Ray is started (and shut down) here unless connected."""
    stream = sys.stdout if stream is None else stream
    jobs = build_jobs(options)
    for job in jobs:
        if job.error:
            print(f"{PROG}: error: {job.error.splitlines()[0]}", file=sys.stderr, flush=True)
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) \
        if threading_main() else None
    own = False
    try:
        own = connect(options)
        import ray

        sweep = Sweep(options, jobs)
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
            options.record(),
            ray_version=ray.__version__, cluster=sweep.cluster, workers=sweep.workers,
            gpus_per_worker=sweep.gpus, worker_versions=sweep.worker_versions,
            jobs=[{"job": j.label, "label_settings": j.label_settings, "model": j.name,
                   "token": j.token, "source": j.source, "out_dir": j.out_dir,
                   "state": j.state, "error": j.error, "written": j.n_written,
                   "skipped": j.n_skipped, "failed": j.n_failed,
                   "args": collect_args_record(j.settings)} for j in jobs],
            worker_deaths=sweep.deaths, tasks=sweep.task_log,
            stage2_errors=sweep.stage2_errors, seconds=time.time() - started)
        write_outputs(options.out, rows, records, provenance)
        for job, capped in sweep.capped.items():
            warning = stage1.power_cap_warning(capped, job.settings.power_iters)
            if warning:
                log.warning("%s: %s", job.label, warning)
        if rows:
            print(f"[SWEEP] summary: {os.path.join(options.out, 'summary.csv')}", file=stream,
                  flush=True)
        print(f"sweep: {written} files written, {skipped} skipped, {failed} failed", file=stream,
              flush=True)
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
