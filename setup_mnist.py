"""MNIST and the embedded scikit-learn digits, laid out as the original tool's ``setup_mnist.py``.

Both classes expose the attributes the original tool's scripts use:
``train_data``, ``train_labels``, ``validation_data``, ``validation_labels``,
``test_data``, ``test_labels``. Images are float32 arrays N x 28 x 28 x 1 with
pixel values in [-0.5, 0.5] (x / 255 - 0.5); labels are one-hot float32
N x 10.

``MNIST`` reads the four standard IDX files (gzip-compressed or not) from a
data folder and downloads them only where a network can be reached. ``Digits``
needs no file at all: it resamples scikit-learn's 1797 bundled 8 x 8
handwritten digits to 28 x 28 so every MNIST architecture runs on it unchanged,
which makes an offline demo possible.

No TensorFlow here: stage 2 and the samplers may import this module cheaply.

Command line (checks or fetches the data and prints one summary line)::

    python setup_mnist.py --data_dir data            # MNIST
    python setup_mnist.py --dataset digits
"""
from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np

import common
from common import ToolError

log = logging.getLogger("clever.data")

#: IDX magic numbers: 0x08 (unsigned byte) in the third byte, the number of dimensions in the fourth.
IDX_IMAGE_MAGIC = 2051  # 0x00000803: ubyte, 3 dimensions
IDX_LABEL_MAGIC = 2049  # 0x00000801: ubyte, 1 dimension
IDX_UBYTE = 0x08

NUM_CLASSES = 10
MNIST_SHAPE = (28, 28, 1)
#: The original tool holds out the first 5000 training images for validation.
VALIDATION_SIZE = 5000

#: Role -> file name of the standard MNIST distribution.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: Mirrors tried in order (the original server at yann.lecun.com is often unavailable).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Seconds to wait for a mirror before trying the next one.
DOWNLOAD_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------
# Shared helpers (also used by setup_cifar.py)
# --------------------------------------------------------------------------
def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixel values 0..255 -> float32 in [-0.5, 0.5] (x / 255 - 0.5), as the original."""
    return (pixels.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels, shape [N] -> one-hot float32, shape [N, num_classes]."""
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


def check_labels(labels: np.ndarray, path: str, num_classes: int = NUM_CLASSES) -> None:
    """Raise a ToolError naming ``path`` if a label is outside 0..num_classes-1."""
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise ToolError(f"{path}: corrupt file: label {int(labels[bad])} of record {bad} "
                        f"is not a class 0..{num_classes - 1}")


def download_file(urls: Sequence[str], dest: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Fetch the first URL of ``urls`` that answers into ``dest``, atomically.

    Returns the URL used. Raises OSError (with every mirror's reason) when none
    answers, e.g. on a machine without network; a partial download never stays
    behind under ``dest``.
    """
    reasons = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                log.warning("downloading %s -> %s", url, dest)
                common.atomic_write(dest, lambda fh: _copy_with_progress(response, fh, total, url))
            return url
        except (OSError, urllib.error.URLError, ValueError) as err:
            # URLError is an OSError; ValueError covers malformed mirror URLs.
            reasons.append(str(getattr(err, "reason", err)))
    if not reasons:
        raise OSError("no URL to download from")
    # Offline, every mirror fails the same way: say it once.
    distinct = list(dict.fromkeys(reasons))
    raise OSError(f"{len(urls)} URL(s) tried, e.g. {urls[0]}: " + "; ".join(distinct))


def _copy_with_progress(source, fh, total: int | None, label: str) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a listed dependency; copying still works without it
        shutil.copyfileobj(source, fh)
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(label),
              disable=None, leave=False) as bar:
        for block in iter(lambda: source.read(1 << 16), b""):
            fh.write(block)
            bar.update(len(block))


def read_maybe_gzip(path: str) -> bytes:
    """Whole content of ``path``, gunzipped when it starts with the gzip magic bytes.

    A truncated or corrupt gzip stream becomes a ToolError naming the file.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read()
            return fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ToolError(f"{path}: truncated or corrupt gzip file ({err}); "
                        "delete it and fetch it again") from None
    except OSError as err:
        raise ToolError(f"{path}: cannot read: {err.strerror or err}") from None


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------
def parse_idx(raw: bytes, path: str, magic: int) -> np.ndarray:
    """Decode the bytes of an IDX file of unsigned bytes into a uint8 array.

    ``magic`` is the expected magic number (2051 for images N x rows x cols,
    2049 for labels N); ``path`` only names the file in errors.
    """
    kind = {IDX_IMAGE_MAGIC: "image", IDX_LABEL_MAGIC: "label"}.get(magic, "IDX")
    if len(raw) < 4:
        raise ToolError(f"{path}: truncated IDX file: {len(raw)} bytes, no header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ToolError(f"{path}: not an IDX {kind} file: magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ToolError(f"{path}: truncated IDX file: header needs {header} bytes, file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have < expected:
        raise ToolError(f"{path}: truncated IDX file: header declares shape {dims} = {expected} bytes "
                        f"of data, file has {have}")
    if have > expected:
        raise ToolError(f"{path}: corrupt IDX file: {have - expected} bytes after the "
                        f"{expected} bytes its header (shape {dims}) declares")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str, magic: int) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) of unsigned bytes; see :func:`parse_idx`."""
    return parse_idx(read_maybe_gzip(path), path, magic)


def encode_idx(array: np.ndarray) -> bytes:
    """The bytes of an (uncompressed) IDX file holding a uint8 array of 1 to 255 dimensions."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX files written here hold uint8 values, got {array.dtype}")
    magic = (IDX_UBYTE << 8) | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    data = encode_idx(array)
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    common.atomic_write(path, lambda fh: fh.write(data))


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------
def find_mnist_files(data_dir: str, download: bool = True,
                     mirrors: Sequence[str] = MNIST_MIRRORS) -> dict[str, str]:
    """Role -> path of the four MNIST files in ``data_dir``, fetching missing ones if allowed.

    A file is accepted gzip-compressed (its standard name) or already
    uncompressed (the name without ``.gz``). Raises a one-line ToolError that
    names the missing files and the folder to put them in when they are
    neither present nor downloadable.
    """
    found, missing = {}, []
    for role, name in MNIST_FILES.items():
        for candidate in (name, name[:-3]):
            path = os.path.join(data_dir, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
        else:
            missing.append(role)
    if not missing:
        return found
    failure = ""
    if download:
        for role in list(missing):
            dest = os.path.join(data_dir, MNIST_FILES[role])
            try:
                download_file([m + MNIST_FILES[role] for m in mirrors], dest)
            except OSError as err:
                failure = f"download failed ({err}); "
                break
            found[role] = dest
            missing.remove(role)
    if missing:
        names = ", ".join(MNIST_FILES[r] for r in missing)
        raise ToolError(f"{data_dir}: MNIST files missing: {names}; {failure}"
                        f"place them in {os.path.abspath(data_dir)}/ (from {mirrors[0] if mirrors else 'an MNIST mirror'}) "
                        "or use --dataset digits, which needs no download")
    return found


def load_idx_pair(images_path: str, labels_path: str,
                  image_shape: tuple[int, int] = MNIST_SHAPE[:2]) -> tuple[np.ndarray, np.ndarray]:
    """Read an images/labels IDX pair -> (images float32 [N, H, W, 1] in [-0.5, 0.5], one-hot [N, 10])."""
    images = read_idx(images_path, IDX_IMAGE_MAGIC)
    labels = read_idx(labels_path, IDX_LABEL_MAGIC)
    if images.shape[1:] != tuple(image_shape):
        raise ToolError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {image_shape[0]}x{image_shape[1]}")
    if images.shape[0] != labels.shape[0]:
        raise ToolError(f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} "
                        f"images of {images_path}")
    check_labels(labels, labels_path)
    return scale_pixels(images)[..., np.newaxis], one_hot(labels)


def hold_out_validation(dataset, train_data: np.ndarray, train_labels: np.ndarray,
                        validation_size: int, source: str) -> None:
    """Set ``dataset``'s validation set to the first ``validation_size`` training
    images and its training set to the rest, as the original tool did."""
    if len(train_data) <= validation_size:
        raise ToolError(f"{source}: only {len(train_data)} training images, fewer than the "
                        f"{validation_size} held out for validation plus one")
    dataset.validation_data = train_data[:validation_size]
    dataset.validation_labels = train_labels[:validation_size]
    dataset.train_data = train_data[validation_size:]
    dataset.train_labels = train_labels[validation_size:]


class MNIST:
    """The MNIST data set from the four standard IDX files in ``data_dir``.

    Attributes (as the original tool): ``train_data`` [N-5000, 28, 28, 1],
    ``validation_data`` [5000, 28, 28, 1] (the first 5000 training images),
    ``test_data`` [10000, 28, 28, 1], float32 in [-0.5, 0.5]; the matching
    ``*_labels`` are one-hot float32 [N, 10].

    ``validation_size`` exists for tests with tiny files; keep the default to
    match the original tool.
    """

    name = "mnist"
    input_shape = MNIST_SHAPE
    num_classes = NUM_CLASSES

    def __init__(self, data_dir: str = "data", download: bool = True,
                 validation_size: int = VALIDATION_SIZE,
                 mirrors: Sequence[str] = MNIST_MIRRORS):
        paths = find_mnist_files(data_dir, download, mirrors)
        train_data, train_labels = load_idx_pair(paths["train_images"], paths["train_labels"])
        self.test_data, self.test_labels = load_idx_pair(paths["test_images"], paths["test_labels"])
        hold_out_validation(self, train_data, train_labels, validation_size, paths["train_images"])


# --------------------------------------------------------------------------
# Digits (scikit-learn's bundled 8x8 handwritten digits)
# --------------------------------------------------------------------------
#: Seed of the fixed split; changing it changes every digits model and score.
DIGITS_SEED = 1215
DIGITS_TEST_SIZE = 360
DIGITS_VALIDATION_SIZE = 180
#: MNIST digits are size-normalised into a 20 x 20 box centred in 28 x 28; do the same.
DIGITS_BOX = 20


def resample_digits(images: np.ndarray, box: int = DIGITS_BOX, size: int = MNIST_SHAPE[0]) -> np.ndarray:
    """8 x 8 digits with values 0..16 -> float32 [N, size, size, 1] in [-0.5, 0.5].

    Bilinear interpolation (pixels treated as areas) to ``box`` x ``box``,
    then a zero border up to ``size`` x ``size`` like MNIST's.
    """
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float64) / 16.0
    factor = box / images.shape[1]
    big = ndimage.zoom(images, (1.0, factor, factor), order=1, grid_mode=True, mode="nearest")
    pad = (size - box) // 2
    out = np.zeros((images.shape[0], size, size), dtype=np.float64)
    out[:, pad:pad + box, pad:pad + box] = np.clip(big, 0.0, 1.0)
    return (out.astype(np.float32) - np.float32(0.5))[..., np.newaxis]


def digits_split(labels: np.ndarray, seed: int = DIGITS_SEED, test_size: int = DIGITS_TEST_SIZE,
                 validation_size: int = DIGITS_VALIDATION_SIZE) -> dict[str, np.ndarray]:
    """Stratified, seeded split of indices 0..N-1 -> {"train", "validation", "test"} index arrays."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    train, validation = train_test_split(rest, test_size=validation_size, stratify=labels[rest],
                                         random_state=seed)
    return {"train": train, "validation": validation, "test": test}


class Digits:
    """scikit-learn's 1797 handwritten digits as an MNIST look-alike (no download).

    Images float32 [N, 28, 28, 1] in [-0.5, 0.5], labels one-hot float32
    [N, 10]; a fixed stratified split of 1257 training, 180 validation and 360
    test images (the same arrays on every call and machine for a given seed).
    """

    name = "digits"
    input_shape = MNIST_SHAPE
    num_classes = NUM_CLASSES

    def __init__(self, data_dir: str | None = None, download: bool = True, seed: int = DIGITS_SEED):
        # data_dir and download are accepted so every loader has the same signature.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = resample_digits(bunch.images)
        labels = np.asarray(bunch.target, dtype=np.int64)
        split = digits_split(labels, seed)
        self.train_data, self.train_labels = images[split["train"]], one_hot(labels[split["train"]])
        self.validation_data = images[split["validation"]]
        self.validation_labels = one_hot(labels[split["validation"]])
        self.test_data, self.test_labels = images[split["test"]], one_hot(labels[split["test"]])
        #: Row of each image in ``sklearn.datasets.load_digits()`` (for tracing a score back).
        self.train_index = split["train"]
        self.validation_index = split["validation"]
        self.test_index = split["test"]


# --------------------------------------------------------------------------
# Command line: fetch/check a data set and print one summary line
# --------------------------------------------------------------------------
def describe(name: str, data) -> str:
    """One parseable summary line of a loaded data set."""
    shape = "x".join(str(d) for d in data.test_data.shape[1:])
    lo = min(float(a.min()) for a in (data.train_data, data.validation_data, data.test_data))
    hi = max(float(a.max()) for a in (data.train_data, data.validation_data, data.test_data))
    return (f"[DATA] dataset = {name}, train = {len(data.train_data)}, "
            f"validation = {len(data.validation_data)}, test = {len(data.test_data)}, "
            f"shape = {shape}, min = {lo:.5g}, max = {hi:.5g}")


LOADERS: Mapping[str, Callable] = {"mnist": MNIST, "digits": Digits}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check (and fetch if missing) MNIST, or build the digits set.")
    parser.add_argument("--dataset", choices=sorted(LOADERS), default="mnist")
    parser.add_argument("--data_dir", default="data", help="folder of the IDX files (default data/)")
    parser.add_argument("--no_download", action="store_true", help="never try the network")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    data = LOADERS[args.dataset](data_dir=args.data_dir, download=not args.no_download)
    print(describe(args.dataset, data))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
