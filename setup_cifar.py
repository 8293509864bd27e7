"""CIFAR-10 from its binary batches, laid out as the original tool's ``setup_cifar.py``.

Reads ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` from
``data_dir/cifar-10-batches-bin/`` (where the official archive unpacks) or
directly from ``data_dir``. Each record is 1 label byte followed by 3072 pixel
bytes in channel-major order (1024 red, 1024 green, 1024 blue, rows of 32).

Attributes as the original: ``train_data``, ``train_labels``,
``validation_data``, ``validation_labels`` (the first 5000 training images),
``test_data``, ``test_labels``; images float32 N x 32 x 32 x 3 in [-0.5, 0.5],
labels one-hot float32 N x 10. No TensorFlow here.

Command line (checks or fetches the data and prints one summary line)::

    python setup_cifar.py --data_dir data
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
from typing import Sequence

import numpy as np

import common
from common import ToolError
from setup_mnist import (NUM_CLASSES, VALIDATION_SIZE, check_labels, describe, download_file,
                         hold_out_validation, one_hot, scale_pixels)

log = logging.getLogger("clever.data")

CIFAR_SHAPE = (32, 32, 3)
#: Bytes per record: one label byte, then 3 x 32 x 32 pixel bytes (CHW).
RECORD_BYTES = 1 + 32 * 32 * 3
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
#: Folder the official archive unpacks to.
ARCHIVE_FOLDER = "cifar-10-batches-bin"
CIFAR_URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",)


def parse_batch(raw: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of one binary batch -> (uint8 images [N, 32, 32, 3] HWC, int labels [N]).

    ``path`` only names the file in errors (empty, truncated, bad label).
    """
    if not raw:
        raise ToolError(f"{path}: empty CIFAR-10 batch file")
    if len(raw) % RECORD_BYTES:
        raise ToolError(f"{path}: truncated or corrupt CIFAR-10 batch: {len(raw)} bytes is not a "
                        f"whole number of {RECORD_BYTES}-byte records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    check_labels(labels, path)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def encode_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """uint8 images [N, 32, 32, 3] and labels [N] -> bytes of a CIFAR-10 binary batch."""
    images = np.asarray(images, dtype=np.uint8)
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], chw], axis=1).tobytes()


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file; see :func:`parse_batch`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ToolError(f"{path}: cannot read: {err.strerror or err}") from None
    return parse_batch(raw, path)


def _batch_folder(data_dir: str) -> str | None:
    """The folder holding all six batch files, or None."""
    for folder in (os.path.join(data_dir, ARCHIVE_FOLDER), data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in TRAIN_FILES + (TEST_FILE,)):
            return folder
    return None


def _extract_archive(archive: str, data_dir: str) -> None:
    """Unpack the official archive's batch files into ``data_dir/cifar-10-batches-bin``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and os.path.dirname(m.name) == ARCHIVE_FOLDER]
            tar.extractall(data_dir, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ToolError(f"{archive}: corrupt CIFAR-10 archive ({err}); delete it and download again") from None


def find_cifar_folder(data_dir: str, download: bool = True,
                      urls: Sequence[str] = CIFAR_URLS) -> str:
    """Folder with the six CIFAR-10 batches, downloading the archive where a network exists.

    Raises a one-line ToolError saying which files to place where otherwise.
    """
    folder = _batch_folder(data_dir)
    if folder:
        return folder
    failure = ""
    archive = os.path.join(data_dir, os.path.basename(urls[0])) if urls else ""
    if download and urls:
        try:
            if not os.path.isfile(archive):
                download_file(urls, archive)
            _extract_archive(archive, data_dir)
        except OSError as err:
            failure = f"download failed ({err}); "
        folder = _batch_folder(data_dir)
        if folder:
            return folder
    present = [f for f in TRAIN_FILES + (TEST_FILE,)
               if os.path.isfile(os.path.join(data_dir, ARCHIVE_FOLDER, f))
               or os.path.isfile(os.path.join(data_dir, f))]
    missing = [f for f in TRAIN_FILES + (TEST_FILE,) if f not in present]
    raise ToolError(f"{data_dir}: CIFAR-10 files missing: {', '.join(missing)}; {failure}"
                    f"place data_batch_1.bin..data_batch_5.bin and test_batch.bin in "
                    f"{os.path.abspath(os.path.join(data_dir, ARCHIVE_FOLDER))}/ "
                    f"(unpack {urls[0] if urls else 'cifar-10-binary.tar.gz'} into {os.path.abspath(data_dir)}/)")


class CIFAR:
    """CIFAR-10: ``train_data`` [N-5000, 32, 32, 3], ``validation_data`` [5000, ...]
    (the first 5000 training images), ``test_data`` [10000, ...], float32 in
    [-0.5, 0.5]; ``*_labels`` one-hot float32 [N, 10].

    ``validation_size`` exists for tests with tiny files; keep the default to
    match the original tool.
    """

    name = "cifar"
    input_shape = CIFAR_SHAPE
    num_classes = NUM_CLASSES

    def __init__(self, data_dir: str = "data", download: bool = True,
                 validation_size: int = VALIDATION_SIZE, urls: Sequence[str] = CIFAR_URLS):
        folder = find_cifar_folder(data_dir, download, urls)
        parts = [read_batch(os.path.join(folder, f)) for f in TRAIN_FILES]
        train_images = np.concatenate([p[0] for p in parts])
        train_labels = np.concatenate([p[1] for p in parts])
        test_images, test_labels = read_batch(os.path.join(folder, TEST_FILE))
        hold_out_validation(self, scale_pixels(train_images), one_hot(train_labels),
                            validation_size, folder)
        self.test_data = scale_pixels(test_images)
        self.test_labels = one_hot(test_labels)


def write_batch(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write uint8 images [N, 32, 32, 3] and labels [N] as a CIFAR-10 binary batch file."""
    data = encode_batch(images, labels)
    common.atomic_write(path, lambda fh: fh.write(data))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check (and fetch if missing) the CIFAR-10 binary batches.")
    parser.add_argument("--data_dir", default="data", help="folder of the batches (default data/)")
    parser.add_argument("--no_download", action="store_true", help="never try the network")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    print(describe("cifar", CIFAR(args.data_dir, download=not args.no_download)))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
