"""What a stage-1 file was made with, and whether a rerun may keep it (NumPy/SciPy only).

A rerun skips the files that exist, so that a stopped run resumes. A file made with
other settings must not be skipped silently: its numbers would be reported for the new
command. Every file this toolkit writes records, under the key ``settings`` (JSON
text), each setting that changes its numbers; before a file is kept, those are
compared with the run's, and the first that differs stops the run with one line.
Files without the key (the original tool's, or this toolkit's before the key existed)
are kept as before.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Sequence

import numpy as np

from common import DEFAULT_DATA_RANGE, ToolError

#: the .mat key holding a file's settings
SETTINGS_KEY = "settings"


def model_digest(weights: Sequence[np.ndarray], architecture: str = "") -> str:
    """sha256 (hex) of a model's architecture (e.g. its Keras JSON) and weights (shapes,
    dtypes and values, in order).

    The model's identity: the same model gives the same digest whatever file it was
    saved in; a retrained model, or the same weights behind another activation, another.
    """
    h = hashlib.sha256(architecture.encode())
    for w in weights:
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_settings(*, dataset: str, model: str, data_range: tuple[float, float] | None,
                 sampler: str, sample_norm: str, radius: float,
                 uniform_ball: bool, seed: int, transform: str | None, order: int,
                 power_iters: int, compute_slope: bool, precision: str, jit_compile: bool,
                 batch_size: int, nsamps: int, converge: Mapping | None) -> dict:
    """The settings that change a stage-1 file's numbers, in the order they are compared.

    N_s, N_b, the image, the target, the activation and the order are in the file's
    name already. ``model``: :func:`model_digest`. The batch size matters through
    min(batch_size, N_s): each model batch of an iteration draws its points from its
    own seed. ``radius``: the sampling radius actually used. ``data_range``: (lo, hi)
    or None (unbounded inputs), recorded as [lo, hi] or null.
    """
    return {
        "dataset": str(dataset), "model": str(model),
        "data_range": None if data_range is None else [float(v) for v in data_range],
        "sampler": str(sampler),
        "sample_norm": str(sample_norm), "radius": float(radius),
        "uniform_ball": bool(uniform_ball), "seed": int(seed), "transform": transform or "",
        "order": int(order), "power_iters": int(power_iters) if order == 2 else None,
        "compute_slope": bool(compute_slope), "precision": str(precision),
        "jit_compile": bool(jit_compile), "model_batch": int(min(batch_size, nsamps)),
        "converge": dict(converge) if converge else None,
    }


def recorded_settings(path: str) -> dict | None:
    """A file's recorded settings, or None when it records none."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=[SETTINGS_KEY])
    except Exception as exc:  # a file that does not read is not a result to keep
        raise ToolError(f"{path}: cannot read this existing result file ({exc}); remove it "
                        "or rerun with --overwrite") from None
    if SETTINGS_KEY not in mat:
        return None
    text = np.asarray(mat[SETTINGS_KEY]).ravel()
    return json.loads(str(text[0]) if text.size else "{}")


#: Settings recorded only since a later version, with the value every file that lacks
#: them was made with (so that those files are still kept by a rerun with that value).
ADDED_SETTINGS = {"data_range": list(DEFAULT_DATA_RANGE)}


def first_difference(recorded: Mapping, expected: Mapping) -> tuple[str, object, object] | None:
    """(setting, recorded value, expected value) of the first setting that differs, or None."""
    for key, want in expected.items():
        have = recorded.get(key, ADDED_SETTINGS.get(key, "<not recorded>"))
        if have != want:
            return key, have, want
    return None


class ResumeCheck:
    """Decides, file by file, whether an existing result may be kept.

    ``check(path)`` returns quietly for a file made with ``expected`` and raises
    :class:`common.ToolError` (one line: the file, the first differing setting with
    both values, what to do) for one made otherwise. ``unrecorded`` lists the kept
    files that record no settings, for the caller's one notice per run.
    """

    def __init__(self, expected: Mapping):
        self.expected = json.loads(json.dumps(expected))  # as a file reads back (lists, not tuples)
        self.unrecorded: list[str] = []

    def __call__(self, path: str) -> None:
        recorded = recorded_settings(path)
        if recorded is None:
            self.unrecorded.append(path)
            return
        diff = first_difference(recorded, self.expected)
        if diff is not None:
            key, have, want = diff
            raise ToolError(f"{path}: made with {key} = {_show(have)}, this run has {key} = "
                            f"{_show(want)}; rerun with --overwrite to recompute it, or choose "
                            "another -s folder")

    def notice(self) -> str | None:
        """The one notice about kept files without recorded settings, or None."""
        if not self.unrecorded:
            return None
        return (f"{len(self.unrecorded)} existing result files record no settings (written by "
                "the original tool or an older version) and are kept unchecked, e.g. "
                f"{self.unrecorded[0]}")


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
