"""Reading stage-1 ``.mat`` files of this toolkit and of the original tool (docs/format.md).

:func:`load_stage1_file` turns one file into a checked :class:`StageOneFile`
(the maxima to fit per bound norm, margin, labels, sampling ball,
provenance) or raises :class:`FileError` naming the file;
:func:`find_mat_files` lists a folder. NumPy/SciPy only.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

import common
from common import Norm, ToolError

#: Input dimension of the original tool's datasets, for files without ``dim``.
_DATASET_DIM = {"mnist": 28 * 28 * 1, "cifar": 32 * 32 * 3}

#: Keys of the data itself; other keys of a file are provenance to pass on.
_DATA_KEYS = frozenset({"G1_max", "G2_max", "Gi_max", "L1_max", "L2_max", "Li_max",
                        "H2_max", "g_x0", "g_x0_grad_2_norm", "pred", "id", "true_label",
                        "target_label", "info", "path"})

#: The bound norms in the order their lines are printed (bnd_norm 1, 2, i).
BOUND_NORMS: tuple[Norm, ...] = (Norm.L1, Norm.L2, Norm.LINF)


class FileError(ToolError):
    """A problem with one input file; the run goes on with the other files."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, eq=False)
class StageOneFile:
    """One stage-1 file, read and checked (docs/format.md).

    ``maxima`` maps each BOUND norm p to the array fitted for it (float64,
    shape (Niters,) or the first --num_samples of it; the stored float dtype is
    kept, as the original fitted in it): the batch maxima of the
    gradient's dual-norm q (``G{q}_max``), of the slope (``L{q}_max`` with
    --use_slope) or, for order 2, of |H2_max| for p = L2 only. ``keys`` names
    the stored key of each. ``radius``/``sample_norm``/``dim`` describe the
    sampling ball (file keys, else the ``args`` struct, else the original
    defaults, docs/format.md); ``dim`` is None when unknown. ``data_range``:
    the model's input range (lo, hi) the points were clipped to, None for
    unbounded inputs; [-0.5, 0.5] for files that do not record it.
    """

    path: str
    img_id: int
    true_label: int
    target_label: int
    info: str
    order: int
    nsamps: int
    niters: int
    activation: str
    g_x0: float
    grad_norm: float  # ||grad g(x0)||_2 (order 2); NaN for order 1
    maxima: Mapping[Norm, np.ndarray]
    keys: Mapping[Norm, str]
    radius: float
    sample_norm: Norm
    dim: int | None
    data_range: tuple[float, float] | None = common.DEFAULT_DATA_RANGE
    provenance: Mapping[str, object] = field(default_factory=dict)
    g_x0_text: str = ""  # g_x0 as the original printed it: str() of the stored value

    @property
    def niters_used(self) -> int:
        """Batch maxima actually fitted (fewer than niters after early stopping)."""
        return int(next(iter(self.maxima.values())).size)

    @property
    def untargeted(self) -> bool:
        return is_untargeted_info(self.info)

    def sort_key(self) -> tuple:
        """The original's order (image id, then info), then target and path."""
        return (self.img_id, self.info, self.target_label, self.path)


def is_untargeted_info(info: str) -> bool:
    """True for the ``class<j>`` infos of an untargeted (all classes) run."""
    prefix = common.TargetKind.ALL.value
    return info.startswith(prefix) and info[len(prefix):].isdigit()


def _plain(value):
    """A loadmat (simplify_cells) value as a JSON-friendly Python value."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return [str(v) for v in value.ravel()] if value.size != 1 else str(value.ravel()[0])
        if value.dtype == object:
            return [_plain(v) for v in value.ravel()]
        if value.size == 1:
            return value.ravel()[0].item()
        return value.tolist() if value.size <= 64 else f"<array shape {value.shape}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _text(value) -> str:
    """A MATLAB string (str, array of str, 1-element cell) as a Python str."""
    value = _plain(value)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"expected one string, got {len(value)} values")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value.strip()


def _scalar(value) -> float:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got {arr.size} values")
    return float(arr[0])


def _integer(value) -> int:
    number = _scalar(value)
    if not number.is_integer():
        raise ValueError(f"expected an integer, got {number}")
    return int(number)


def _key(mat: Mapping, key: str, convert):
    """``convert(mat[key])``; KeyError if absent, ValueError naming the key if malformed."""
    if key not in mat:
        raise KeyError(key)
    try:
        return convert(mat[key])
    except (ValueError, TypeError) as err:
        raise ValueError(f"key {key!r}: {err}") from None


def _args_dict(mat: Mapping) -> dict:
    """The run's arguments: a struct (original tool), a dict or a JSON string."""
    raw = mat.get("args")
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    plain = _plain(raw)
    return plain if isinstance(plain, dict) else {}


def _sampling_ball(mat: Mapping, args: Mapping) -> tuple[float, Norm, int | None]:
    """Radius, norm and input dimension of the sampling ball of a file."""
    def lookup(name, convert, default):
        source = mat if name in mat else args
        return _key(source, name, convert) if name in source else default

    norm_name = lookup("sample_norm", lambda v: _text(v).lower(), "l2")
    if norm_name not in common.SAMPLE_NORMS:
        raise ValueError(f"key 'sample_norm': unknown norm {norm_name!r} (l2, li or l1)")
    radius = lookup("radius", _scalar, common.DEFAULT_RADIUS[norm_name])
    dataset = lookup("dataset", lambda v: _text(v).lower(), "")
    dim = lookup("dim", _integer, _DATASET_DIM.get(dataset))
    return radius, common.SAMPLE_NORMS[norm_name], dim


def _data_range(value) -> tuple[float, float] | None:
    """The ``data_range`` key, [lo, hi] ([-inf, inf]: unbounded inputs), as (lo, hi) or None."""
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size != 2 or not arr[0] < arr[1]:
        raise ValueError(f"expected [lo, hi] with lo < hi, got {arr.tolist()}")
    return None if np.isinf(arr).all() else (float(arr[0]), float(arr[1]))


def _maxima(mat: Mapping, key: str, num_samples: int) -> np.ndarray:
    def convert(value):
        arr = np.atleast_1d(np.asarray(value))
        return (arr if arr.dtype.kind == "f" else arr.astype(np.float64)).ravel()

    arr = _key(mat, key, convert)
    if arr.size == 0:
        raise ValueError(f"{key} is empty")
    if num_samples:
        if num_samples > arr.size:
            raise ValueError(f"{key} has {arr.size} maxima, fewer than --num_samples "
                             f"{num_samples}")
        arr = arr[:num_samples]
    return arr


def load_stage1_file(path: str, *, use_slope: bool = False, num_samples: int = 0,
                     user_type: str = "") -> StageOneFile:
    """Read one stage-1 ``.mat`` file of either tool; raise :class:`FileError` if unusable.

    ``use_slope`` fits ``L*_max`` (SLOPE baseline) instead of ``G*_max``;
    ``num_samples`` > 0 keeps the first N maxima; ``user_type`` renames the
    info ``user`` (the original's --user_type, used for ImageNet runs whose
    targets came from a list).
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, simplify_cells=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise FileError(path, f"cannot read the .mat file ({type(err).__name__}: {err})") from None
    return stage1_file_from_mapping(mat, path, use_slope=use_slope, num_samples=num_samples,
                                    user_type=user_type)


def stage1_file_from_mapping(mat: Mapping, path: str, *, use_slope: bool = False,
                             num_samples: int = 0, user_type: str = "") -> StageOneFile:
    """A :class:`StageOneFile` from the keys of a ``.mat`` file held in memory.

    ``mat``: what ``scipy.io.loadmat(..., simplify_cells=True)`` returns, or
    the dict ``stage1.mat_record`` builds before writing it (the Python API
    scores that without a file). ``path`` names it in messages; when it is not
    a stage-1 file name, the id, labels and info come from the keys. Raises
    :class:`FileError` as :func:`load_stage1_file` does.
    """
    try:
        name = common.MatName.parse(path)
    except ToolError:
        name = None
    try:
        key_order = 2 if "H2_max" in mat else 1 if "G2_max" in mat or "L2_max" in mat else None
        if key_order is None:
            raise KeyError("G2_max")
        order = name.order if name is not None else key_order
        if order != key_order:
            raise ValueError(f"the file name says order {order} but the file holds order-"
                             f"{key_order} data ({'H2_max' if key_order == 2 else 'G2_max'})")

        maxima: dict[Norm, np.ndarray] = {}
        keys: dict[Norm, str] = {}
        if order == 1:
            for norm in BOUND_NORMS:
                grad = common.dual_norm(norm)
                keys[norm] = grad.slope_key if use_slope else grad.grad_key
                maxima[norm] = _maxima(mat, keys[norm], num_samples)
            grad_norm = math.nan
        elif order == 2:
            if use_slope:
                raise ValueError("--use_slope needs order-1 files (L1_max, L2_max, Li_max)")
            keys[Norm.L2] = "H2_max"
            # The original stored H2_max without abs for some runs; only the
            # magnitude of the negative curvature enters the bound.
            maxima[Norm.L2] = np.abs(_maxima(mat, "H2_max", num_samples))
            grad_norm = _key(mat, "g_x0_grad_2_norm", _scalar)
        else:
            raise ValueError(f"order {order} is not supported (1 or 2)")

        g_x0 = _key(mat, "g_x0", _scalar)
        g_x0_text = str(np.asarray(mat["g_x0"]).squeeze())
        if not (math.isfinite(g_x0) and (order == 1 or math.isfinite(grad_norm))):
            raise ValueError(f"g_x0 = {g_x0}" + ("" if order == 1 else
                             f", g_x0_grad_2_norm = {grad_norm}") + ": not finite")

        def field_or_name(key, attr, convert):
            if key in mat or name is None:
                return _key(mat, key, convert)
            return getattr(name, attr)

        img_id = field_or_name("id", "img_id", _integer)
        true_label = field_or_name("true_label", "true_label", _integer)
        target_label = field_or_name("target_label", "target_label", _integer)
        info = field_or_name("info", "info", _text)
        if user_type and info == common.TargetKind.USER.value:
            info = user_type
        args = _args_dict(mat)
        radius, sample_norm, dim = _sampling_ball(mat, args)
        data_range = (_key(mat, "data_range", _data_range) if "data_range" in mat
                      else common.DEFAULT_DATA_RANGE)
        nsamps = name.nsamps if name is not None else int(args.get("Nsamps", 0) or 0)
        niters = name.niters if name is not None else int(next(iter(maxima.values())).size)
        activation = name.activation if name is not None else ""
    except KeyError as err:
        raise FileError(path, f"lacks the key {err.args[0]!r}") from None
    except (ValueError, TypeError) as err:
        raise FileError(path, str(err)) from None

    provenance = {k: _plain(v) for k, v in mat.items()
                  if not k.startswith("__") and k not in _DATA_KEYS}
    return StageOneFile(path=path, img_id=img_id, true_label=true_label,
                        target_label=target_label, info=info, order=order, nsamps=nsamps,
                        niters=niters, activation=activation, g_x0=g_x0, grad_norm=grad_norm,
                        maxima=maxima, keys=keys, radius=radius, sample_norm=sample_norm,
                        dim=dim, data_range=data_range, provenance=provenance,
                        g_x0_text=g_x0_text)


def find_mat_files(folder: str, match: str = "") -> list[str]:
    """All ``.mat`` files under ``folder`` (recursively), sorted; ToolError if none.

    ``match``: a glob the base names must match (e.g. ``128_20_*_relu_order1.mat``).
    """
    if not os.path.exists(folder):
        raise ToolError(f"{folder}: no such folder")
    if not os.path.isdir(folder):
        raise ToolError(f"{folder}: not a folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files
                     if f.endswith(".mat") and not f.startswith(".tmp-")
                     and (not match or fnmatch.fnmatchcase(f, match)))
    if not found:
        raise ToolError(f"{folder}: no .mat files found (searched recursively"
                        + (f" for --match {match!r})" if match else ")"))
    return sorted(found)
