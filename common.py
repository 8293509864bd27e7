"""Shared, TensorFlow-free pieces of the CLEVER toolkit.

Everything here is importable by stage 2 (``clever.py``) without TensorFlow:
norm names and dual norms, target kinds, the ``.mat`` file naming of the
original tool, provenance records, atomic file writes, seeding and the thin
CLI wrapper that turns :class:`ToolError` into a one-line error message.
"""
from __future__ import annotations

import enum
import io
import json
import logging
import os
import secrets
import platform
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

TOOL_NAME = "clever-tf2"
__version__ = "2.0.0"

#: Data range of MNIST, CIFAR, digits and (after in-model preprocessing) ImageNet inputs.
DATA_MIN = -0.5
DATA_MAX = 0.5

log = logging.getLogger("clever")


class ToolError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# --------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------
class Norm(enum.Enum):
    """A vector norm, named as the original tool names it in keys and printouts.

    ``value`` is the suffix used in the .mat keys (``G1_max``, ``G2_max``,
    ``Gi_max``) and in printed labels (``clever_L1``, ``clever_L2``,
    ``clever_Li``).
    """

    L1 = "1"
    L2 = "2"
    LINF = "i"

    @property
    def ord(self) -> float:
        """The ``ord`` argument of ``numpy.linalg.norm`` for this norm."""
        return {Norm.L1: 1.0, Norm.L2: 2.0, Norm.LINF: np.inf}[self]

    @property
    def label(self) -> str:
        """``L1``, ``L2`` or ``Li``: the label used in printed statistics."""
        return "L" + self.value

    @property
    def grad_key(self) -> str:
        """Key of the gradient-norm batch maxima in a stage-1 file (``G1_max``...)."""
        return "G" + self.value + "_max"

    @property
    def slope_key(self) -> str:
        """Key of the slope (SLOPE baseline) batch maxima (``L1_max``...)."""
        return "L" + self.value + "_max"

    @classmethod
    def parse(cls, text: str) -> "Norm":
        """Accept ``l1``/``1``/``L1``, ``l2``/``2``, ``li``/``linf``/``inf``/``i``."""
        key = str(text).strip().lower().lstrip("l")
        aliases = {"1": cls.L1, "2": cls.L2, "i": cls.LINF, "inf": cls.LINF}
        if key not in aliases:
            raise ToolError(f"unknown norm {text!r}; use one of l1, l2, li")
        return aliases[key]


def dual_norm(norm: Norm) -> Norm:
    """The dual norm q of p (1/p + 1/q = 1): L1 <-> Linf, L2 <-> L2.

    A perturbation bound in norm p needs the Lipschitz constant measured with
    the gradient's norm q = dual_norm(p) (docs/format.md).
    """
    return {Norm.L1: Norm.LINF, Norm.L2: Norm.L2, Norm.LINF: Norm.L1}[norm]


#: ``--sample_norm`` choices of the original tool and the norm of their ball.
SAMPLE_NORMS: dict[str, Norm] = {"l2": Norm.L2, "li": Norm.LINF, "l1": Norm.L1}

#: Default maximum sampling radius of the original tool per ``--sample_norm``.
DEFAULT_RADIUS: dict[str, float] = {"l2": 3.0, "li": 0.1, "l1": 30.0}


def radius_cap(radius: float, sample_norm: Norm, bound_norm: Norm, dim: int) -> float:
    """Largest p-ball radius inside the s-ball of ``radius`` in ``dim`` dimensions.

    CLEVER-t is capped at the sampling radius R (Algorithm 1). A bound in norm
    p is only certified inside the region sampled, an s-ball; the largest
    p-ball inside it has radius R / d^max(0, 1/s - 1/p) (docs/format.md).
    """
    inv = {Norm.L1: 1.0, Norm.L2: 0.5, Norm.LINF: 0.0}
    return float(radius) / float(dim) ** max(0.0, inv[sample_norm] - inv[bound_norm])


# --------------------------------------------------------------------------
# Data range (--data_range)
# --------------------------------------------------------------------------
#: The model's input range unless --data_range says otherwise: the original tool's.
DEFAULT_DATA_RANGE: tuple[float, float] = (DATA_MIN, DATA_MAX)


def parse_data_range(value) -> tuple[float, float] | None:
    """``--data_range``'s value as (lo, hi), or None for ``none`` (unbounded inputs).

    ``value``: the flag's tokens (``["0", "255"]``, ``["0,255"]`` as a sweep
    spec's list arrives, ``["none"]``), or already (lo, hi) / None. Raises
    :class:`ToolError` naming the flag unless lo < hi, both finite.
    """
    if value is None:
        return None
    tokens = [value] if isinstance(value, str) else list(value)
    if len(tokens) == 1 and isinstance(tokens[0], str):
        if tokens[0].strip().lower() == "none":
            return None
        tokens = tokens[0].split(",")
    shown = " ".join(str(t).strip() for t in tokens)
    try:
        lo, hi = (float(t) for t in tokens)
    except (TypeError, ValueError):
        raise ToolError(f"--data_range: expected LO HI (two numbers) or none, got {shown!r}") \
            from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ToolError(f"--data_range: LO must be below HI, both finite, got {shown!r}")
    return lo, hi


def default_radius(sample_norm: str, data_range: tuple[float, float] | None) -> float:
    """The original's default radius of ``sample_norm`` times the width hi - lo of the range.

    The original's radii are for inputs in a range of width 1; an unbounded
    range has no default (ToolError: --radius is needed).
    """
    if data_range is None:
        raise ToolError("--data_range none: the inputs are unbounded, so there is no default "
                        "sampling radius; give --radius")
    return DEFAULT_RADIUS.get(sample_norm, 1.0) * (data_range[1] - data_range[0])


def scale_to_range(images: np.ndarray, data_range: tuple[float, float] | None) -> np.ndarray:
    """Images in the toolkit's [-0.5, 0.5] mapped affinely onto ``data_range``: float32.

    Unchanged (the same array) for the default range and for None (unbounded
    inputs have no range to map onto: the images stay as the toolkit loads them).
    """
    if data_range is None or tuple(data_range) == DEFAULT_DATA_RANGE:
        return images
    lo, hi = data_range
    scale = np.float32((hi - lo) / (DATA_MAX - DATA_MIN))
    out = (np.asarray(images, np.float32) - np.float32(DATA_MIN)) * scale + np.float32(lo)
    return np.clip(out, np.float32(lo), np.float32(hi))  # no rounding past the range


def data_range_value(data_range: tuple[float, float] | None) -> np.ndarray:
    """float64 [2] (lo, hi) as a .mat file records it; (-inf, inf) for unbounded inputs."""
    return np.array((-np.inf, np.inf) if data_range is None else data_range, np.float64)


# --------------------------------------------------------------------------
# Target classes
# --------------------------------------------------------------------------
class TargetKind(enum.Enum):
    """How a target class is chosen; ``value`` is the ``info`` string in files.

    ``bit`` is the bit of the original tool's ``--target_type`` mask.
    """

    TOP2 = "top2"
    RANDOM = "random"
    LEAST = "least"
    USER = "user"
    ALL = "class"  # untargeted: one file per class j, info "class<j>"

    @property
    def bit(self) -> int:
        return {TargetKind.TOP2: 0b00001, TargetKind.RANDOM: 0b00010,
                TargetKind.LEAST: 0b00100, TargetKind.USER: 0b01000,
                TargetKind.ALL: 0b10000}[self]


#: Names accepted by ``--targets`` (the readable form of ``--target_type``).
TARGET_NAMES: dict[str, TargetKind] = {
    "top2": TargetKind.TOP2, "random": TargetKind.RANDOM, "rand": TargetKind.RANDOM,
    "least": TargetKind.LEAST, "user": TargetKind.USER, "all": TargetKind.ALL,
}

DEFAULT_TARGET_TYPE = 0b01111


def target_kinds_from_mask(mask: int) -> list[TargetKind]:
    """Decode the original ``--target_type`` bit mask (bit4 means all classes)."""
    if mask < 0 or mask >= 0b100000:
        raise ToolError(f"--target_type {mask} is out of range; use a mask in 0..31")
    return [k for k in TargetKind if mask & k.bit]


def target_kinds_from_names(text: str) -> list[TargetKind]:
    """Parse ``--targets top2,random,least,all,user`` into target kinds."""
    kinds = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name not in TARGET_NAMES:
            raise ToolError(f"--targets: unknown target {name!r}; use any of "
                            + ",".join(k for k in TARGET_NAMES if k != "rand"))
        if TARGET_NAMES[name] not in kinds:
            kinds.append(TARGET_NAMES[name])
    if not kinds:
        raise ToolError("--targets is empty")
    return kinds


def info_string(kind: TargetKind, target_label: int) -> str:
    """The ``info`` field of a file: least/top2/random/user, or class<j>."""
    return f"class{target_label}" if kind is TargetKind.ALL else kind.value


# --------------------------------------------------------------------------
# Stage-1 file names (docs/format.md)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class MatName:
    """The fields encoded in a stage-1 file name."""

    nsamps: int
    niters: int
    img_id: int
    true_label: int
    target_label: int
    info: str
    activation: str
    order: int

    def filename(self) -> str:
        return (f"{self.nsamps}_{self.niters}_{self.img_id}_{self.true_label}_"
                f"{self.target_label}_{self.info}_{self.activation}_order{self.order}.mat")

    @classmethod
    def parse(cls, filename: str) -> "MatName":
        """Parse a file name written by this toolkit or the original tool."""
        stem = os.path.basename(filename)
        if stem.endswith(".mat"):
            stem = stem[:-4]
        parts = stem.split("_")
        try:
            order = int(parts[-1].replace("order", ""))
            return cls(int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]),
                       int(parts[4]), "_".join(parts[5:-2]), parts[-2], order)
        except (IndexError, ValueError):
            raise ToolError(f"{filename}: not a stage-1 file name "
                            "(<Nsamp>_<Niters>_<id>_<true>_<target>_<info>_<act>_order<k>.mat)")


def output_dir(save: str, dataset: str, model_name: str) -> str:
    """``<save>/<dataset>_<model_name>`` as the original tool lays results out."""
    return os.path.join(save, f"{dataset}_{model_name}")


# --------------------------------------------------------------------------
# Provenance, seeding, files
# --------------------------------------------------------------------------
def versions(with_tf: bool | None = None) -> dict[str, str]:
    """Versions of the tool and its numeric stack.

    TensorFlow's version is included when TensorFlow is already imported
    (stage 1) or ``with_tf`` is true; stage 2 never imports it for this.
    """
    import scipy

    out = {"tool": f"{TOOL_NAME} {__version__}", "python": platform.python_version(),
           "numpy": np.__version__, "scipy": scipy.__version__}
    if with_tf or (with_tf is None and "tensorflow" in sys.modules):
        import tensorflow as tf  # noqa: WPS433 (deliberately lazy)

        out["tensorflow"] = tf.__version__
        try:
            import keras

            out["keras"] = keras.__version__
        except ImportError:  # pragma: no cover - Keras ships with TF >= 2.16
            pass
    return out


def provenance(args: Mapping | None = None, **extra) -> dict:
    """A JSON-serialisable record of what produced a result."""
    record = {"argv": list(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": platform.node(), "versions": versions()}
    if args is not None:
        record["args"] = {k: jsonable(v) for k, v in dict(args).items()}
    record.update({k: jsonable(v) for k, v in extra.items()})
    return record


def jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def set_seed(seed: int, with_tf: bool = True) -> None:
    """Seed Python's ``random``, NumPy's global RNG and (if wanted) TensorFlow."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if with_tf:
        import keras
        import tensorflow as tf

        tf.random.set_seed(seed)
        # Keras 3 keeps its own seed for initialisers: random weights become reproducible.
        keras.utils.set_random_seed(seed)


def derived_seed(*parts: int) -> np.random.SeedSequence:
    """A SeedSequence from several integers (run seed, image id, batch...).

    Streams seeded this way do not depend on the order work is done in, so a
    resumed or parallel run draws the same numbers as a fresh serial one.
    """
    return np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file via a temporary name in the same folder, then rename.

    A crash or Ctrl-C leaves either the old file or the complete new one,
    never a half-written one; the temporary file is removed on failure.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The suffix keeps a temporary file from matching '*.mat' (stage 2 searches
    # for those); the pid lets remove_stale_temp_files tell whose it is.
    # The name is made first and the file created inside the try: a Ctrl-C between
    # creating it and entering the try (possible with mkstemp) would leave it behind.
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-"
                               f"{os.path.basename(path)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_TMP_PREFIX = ".tmp-"


def remove_stale_temp_files(folder: str) -> int:
    """Delete temporary files of :func:`atomic_write` whose writing process is gone.

    Only a SIGKILL or a power cut leaves one; a live process's files are kept.
    Returns the number removed.
    """
    removed = 0
    if not os.path.isdir(folder):
        return 0
    for name in os.listdir(folder):
        if not (name.startswith(_TMP_PREFIX) and name.endswith(".part")):
            continue
        try:
            pid = int(name[len(_TMP_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_savemat(path: str, data: Mapping) -> None:
    """``scipy.io.savemat`` through :func:`atomic_write`."""
    import scipy.io

    atomic_write(path, lambda fh: scipy.io.savemat(fh, dict(data)))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------
# CLI plumbing
# --------------------------------------------------------------------------
def setup_logging(verbose: int = 0) -> None:
    """Diagnostics to stderr; stdout stays for the statistics users parse."""
    level = logging.WARNING - 10 * max(0, min(verbose, 2))
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # TensorFlow's C++ logs are noise for users of a CLI.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_cli(main: Callable[[object], int | None], parse_args: Callable[[Sequence[str]], object],
            argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``main(parse_args(argv))`` the way every script of the toolkit does.

    A :class:`ToolError` becomes ``<prog>: error: <message>`` on stderr and
    exit status 2; Ctrl-C exits with 130 after ``main``'s own clean-up ran.
    """
    prog = prog or os.path.basename(sys.argv[0] or "clever")
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        status = main(args)
        return int(status or 0)
    except ToolError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed results are kept, rerun to resume",
              file=sys.stderr)
        return 130


def check_positive(name: str, value, allow_zero: bool = False):
    """Raise a :class:`ToolError` naming the flag when ``value`` is not positive."""
    if value is None:
        return value
    if value < 0 or (value == 0 and not allow_zero):
        raise ToolError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return value
