"""The jobs of a sweep: one per model, from --models or a --spec TOML file.

Each job holds its ``settings.Stage1Settings`` (the sweep's shared stage-1
flags, then the spec's ``[defaults]`` and the job's own table, then its model),
the file or folder its model is loaded from on the workers, its label (the
model plus the settings that tell it apart from the sweep's other jobs of
that model: :func:`job_labels`), and the driver's bookkeeping (queue of image
tasks, counts, Ray object refs). Pure argument handling: no Ray, no
TensorFlow at import.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import common
from common import ToolError
from settings import SettingsError, Stage1Settings

#: Flags of collect_gradients.py that --models replaces.
MODEL_FLAGS = ("-m", "--model_name", "--model_path")
#: Suffixes that name a model file rather than a zoo name.
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".pb")
#: Settings that change neither a job's files nor their numbers: never in a label.
_UNLABELLED = ("overwrite", "quiet", "no_progress", "verbose",
               "kinds")  # kinds: derived from --targets/--target_type, which are compared
#: Where a job writes: in its label only when nothing else tells two jobs apart.
_SAVE = "save"


def job_settings(kwargs: Mapping[str, Any], where: str) -> Stage1Settings:
    """``Stage1Settings.from_kwargs(**kwargs)``; a bad setting is a ToolError naming ``where``."""
    try:
        return Stage1Settings.from_kwargs(**kwargs)
    except SettingsError as err:
        raise ToolError(f"{where}: {err}") from None


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------
@dataclass
class Job:
    """One model's share of the sweep: its stage-1 settings and the model's source."""

    index: int
    token: str                 # as written in --models / the spec
    name: str                  # output folder suffix (model name or file stem)
    label: str = ""            # unique in the sweep: <dataset>_<name>[ key=value ...]
    label_settings: dict = field(default_factory=dict)  # the key=value settings of the label
    settings: Stage1Settings | None = None   # the job's stage-1 settings
    source: str = ""           # file or folder shipped to the workers ('' for none)
    error: str = ""            # set when the job failed
    # planning and progress
    state: str = "new"         # new, planning, running, done, failed
    out_dir: str = ""
    queue: deque = field(default_factory=deque)   # pending Task
    files: list = field(default_factory=list)     # every (task, target, path) of the job
    n_written: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    setup_failures: int = 0
    actors: int = 0            # live actors bound to the job
    inflight: int = 0          # scoring calls in flight
    blob_ref: object = None
    images_ref: object = None
    ids: list = field(default_factory=list)
    user_targets: dict = field(default_factory=dict)
    test_data: object = None
    test_labels: object = None
    label_offset: int = 0


@dataclass
class Task:
    job: Job
    pos: int                   # position of the image in the job's image array
    task: object               # utils.ImageTask
    pending: list              # [(utils.Target, path)]
    attempt: int = 0


def _spec_kwargs(table: dict, where: str) -> dict:
    """A TOML table of stage-1 settings (collect_gradients.py's long flag names) as keywords
    of ``Stage1Settings.from_kwargs`` (lists stay lists: ``targets``, ``data_range``)."""
    out = {}
    for key, value in table.items():
        if key in ("models", "model"):
            continue
        name = key.lstrip("-")
        if "--" + name in MODEL_FLAGS or "-" + name in MODEL_FLAGS:
            raise ToolError(f"{where}: key {key!r}: list models under 'models'")
        out[name] = value
    return out


def _spec_jobs(path: str) -> list[tuple[str, dict, str]]:
    """(model token, settings, where) of every job of a --spec file."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ToolError(f"{path}: not a readable TOML file ({err})") from None
    unknown = set(spec) - {"defaults", "job"}
    if unknown:
        raise ToolError(f"{path}: unknown table {sorted(unknown)[0]!r}; use [defaults] and [[job]]")
    defaults = _spec_kwargs(spec.get("defaults", {}), f"{path} [defaults]")
    jobs = spec.get("job", [])
    if not isinstance(jobs, list) or not jobs:
        raise ToolError(f"{path}: no [[job]] tables")
    out = []
    for k, table in enumerate(jobs, start=1):
        where = f"{path} job {k}"
        models = table.get("models", table.get("model"))
        if isinstance(models, str):
            models = [m for m in models.split(",") if m.strip()]
        if not models:
            raise ToolError(f"{where}: no 'models'")
        values = {**defaults, **_spec_kwargs(table, where)}
        out += [(str(m).strip(), values, where) for m in models]
    return out


def _is_model_file(token: str) -> bool:
    return os.path.exists(token) or token.lower().endswith(MODEL_SUFFIXES) or os.sep in token


def build_jobs(options) -> list[Job]:
    """One :class:`Job` per model of a ``sweep_driver.SweepOptions`` (its ``models``, its
    ``spec`` file, its shared ``stage1`` settings); a job whose settings or model are bad
    has ``error`` set."""
    entries = [(m.strip(), {}, "--models") for m in options.models.split(",") if m.strip()]
    if options.spec:
        entries += _spec_jobs(options.spec)
    jobs: list[Job] = []
    for index, (token, values, where) in enumerate(entries):
        is_file = _is_model_file(token)
        name = (os.path.splitext(os.path.basename(os.path.normpath(token)))[0] if is_file
                else token)
        job = Job(index, token, name)
        jobs.append(job)
        try:
            if token.lower().endswith(".pb"):
                # An original frozen graph of a named ImageNet model: its --model_path.
                if not os.path.isfile(token):
                    raise ToolError(f"{token}: model file not found")
                model = {"model_name": name, "model_path": token}
            elif is_file:
                model = {"model_path": token}
            else:
                model = {"model_name": token}
            job.settings = job_settings({**options.stage1, **values, **model}, where)
            job.source = _model_source(job)
            job.out_dir = job.settings.out_dir(job.name)
        except ToolError as err:
            job.error, job.state = str(err), "failed"
    seen = {}
    for job in jobs:
        if job.out_dir and job.out_dir in seen and not job.error:
            job.error, job.state = (f"{job.token}: writes into {job.out_dir} like "
                                    f"{seen[job.out_dir]}; list each model once"), "failed"
        seen.setdefault(job.out_dir, job.token)
    labelled = [j for j in jobs if not j.error]
    named = job_labels([(os.path.basename(j.out_dir), collect_args_record(j.settings))
                        for j in labelled])
    for job, (label, settings) in zip(labelled, named):
        job.label, job.label_settings = label, settings
    for job in jobs:
        job.label = job.label or job.name
    return jobs


def collect_args_record(settings: Stage1Settings | None) -> dict:
    """A job's stage-1 settings as JSON values, in flag order."""
    if settings is None:
        return {}
    return {k: common.jsonable(v) for k, v in settings.as_dict().items()}


def _setting_text(value) -> str:
    if value is None:
        return "default"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def job_labels(entries: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """A unique label for each job and the settings that tell it apart.

    ``entries``: per job, its base name ``<dataset>_<model>`` and its settings
    (collect_gradients arguments as JSON values). A job alone with its base
    name is labelled by that name, with no settings; jobs sharing one get
    ``<base> key=value ...`` for every setting in which they differ (in the
    settings' order; the output folder only when nothing else differs, and
    never the settings that change no number, such as ``--overwrite``).
    Returns (label, {key: value}) per entry, in order.
    """
    by_base: dict[str, list[int]] = {}
    for k, (base, _) in enumerate(entries):
        by_base.setdefault(base, []).append(k)
    out: list[tuple[str, dict]] = [(base, {}) for base, _ in entries]
    for base, members in by_base.items():
        if len(members) < 2:
            continue
        settings = [entries[k][1] for k in members]
        keys = [key for key in settings[0] if key not in _UNLABELLED]
        keys += [key for s in settings[1:] for key in s
                 if key not in keys and key not in _UNLABELLED]
        differ = [key for key in keys
                  if len({repr(s.get(key)) for s in settings}) > 1]
        if any(key != _SAVE for key in differ):
            differ = [key for key in differ if key != _SAVE]
        for k, s in zip(members, settings):
            chosen = {key: s.get(key) for key in differ}
            text = " ".join(f"{key}={_setting_text(v)}" for key, v in chosen.items())
            out[k] = (f"{base} {text}" if text else base, chosen)
    # Settings that print alike (or none left to print): numbered, so labels stay unique.
    counts: dict[str, int] = {}
    for label, _ in out:
        counts[label] = counts.get(label, 0) + 1
    seen: dict[str, int] = {}
    for k, (label, chosen) in enumerate(out):
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            out[k] = (f"{label} #{seen[label]}", chosen)
    return out


def _model_source(job: Job) -> str:
    """The file or folder whose bytes the workers load the model from ('' if none)."""
    a = job.settings
    if a.model_path:
        return a.model_path
    if a.dataset == "imagenet":
        # Zoo models are built on the worker; a weights FILE travels with the job.
        return a.weights if os.path.isfile(str(a.weights)) else ""
    import models

    return models.model_file(a.dataset, a.model_name, a.activation, a.models_dir)
