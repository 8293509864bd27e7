"""Data sets: MNIST IDX files, CIFAR-10 binary batches and the embedded digits.

The tiny files here are written byte by byte with ``struct``/NumPy,
independently of the toolkit's own writers, so a reader and writer that share
a mistake cannot pass together.
"""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import setup_cifar
import setup_mnist
from common import ToolError, run_cli
from setup_cifar import CIFAR
from setup_mnist import MNIST, Digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# helpers writing files by hand
# --------------------------------------------------------------------------
def idx_images_bytes(images, magic=2051):
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels, magic=2049):
    return struct.pack(">II", magic, len(labels)) + np.asarray(labels, np.uint8).tobytes()


def write_bytes(path, data, compress=True):
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data) if compress else data)


def make_mnist(folder, n_train=12, n_test=7, seed=0, compress=True):
    """Write the four MNIST files; returns the uint8 arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    # Make sure the extremes 0 and 255 are present so the range check bites.
    arrays["train_images"][0, 0, :2] = [0, 255]
    os.makedirs(folder, exist_ok=True)
    for role, name in setup_mnist.MNIST_FILES.items():
        data = (idx_images_bytes if role.endswith("images") else idx_labels_bytes)(arrays[role])
        write_bytes(os.path.join(folder, name if compress else name[:-3]), data, compress)
    return arrays


def cifar_batch_bytes(images, labels):
    """Records of 1 label byte + red plane + green plane + blue plane (rows of 32)."""
    out = bytearray()
    for img, lab in zip(images, labels):
        out.append(int(lab))
        for channel in range(3):
            out += img[:, :, channel].tobytes()
    return bytes(out)


def make_cifar(folder, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    train_images, train_labels = [], []
    for name in setup_cifar.TRAIN_FILES:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        write_bytes(os.path.join(folder, name), cifar_batch_bytes(images, labels), compress=False)
        train_images.append(images)
        train_labels.append(labels)
    test_images = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test)
    write_bytes(os.path.join(folder, setup_cifar.TEST_FILE), cifar_batch_bytes(test_images, test_labels),
                compress=False)
    return (np.concatenate(train_images), np.concatenate(train_labels), test_images, test_labels)


def assert_one_hot(onehot, labels):
    assert onehot.dtype == np.float32
    assert onehot.shape == (len(labels), 10)
    assert np.array_equal(onehot.sum(axis=1), np.ones(len(labels)))
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    assert np.array_equal(onehot.argmax(axis=1), np.asarray(labels))


def cli(script, *args):
    """Run a data script as users do; returns (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, stderr, *fragments):
    assert rc == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_tiny_idx_files_exactly(tmp_path, compress):
    arrays = make_mnist(tmp_path, compress=compress)
    data = MNIST(str(tmp_path), download=False, validation_size=5)
    expected_train = arrays["train_images"].astype(np.float32) / 255 - 0.5
    # Validation is the first 5 training images, training the rest (as the original tool).
    assert data.validation_data.shape == (5, 28, 28, 1)
    assert data.train_data.shape == (7, 28, 28, 1)
    assert data.test_data.shape == (7, 28, 28, 1)
    for arr in (data.train_data, data.validation_data, data.test_data):
        assert arr.dtype == np.float32
        assert arr.min() >= -0.5 and arr.max() <= 0.5
    np.testing.assert_allclose(data.validation_data[..., 0], expected_train[:5], atol=1e-7)
    np.testing.assert_allclose(data.train_data[..., 0], expected_train[5:], atol=1e-7)
    np.testing.assert_allclose(data.test_data[..., 0], arrays["test_images"] / 255.0 - 0.5, atol=1e-7)
    assert data.validation_data[0, 0, 0, 0] == -0.5 and data.validation_data[0, 0, 1, 0] == 0.5
    assert_one_hot(data.validation_labels, arrays["train_labels"][:5])
    assert_one_hot(data.train_labels, arrays["train_labels"][5:])
    assert_one_hot(data.test_labels, arrays["test_labels"])


def test_default_validation_split_is_first_5000(tmp_path):
    arrays = make_mnist(tmp_path, n_train=5003, n_test=2)
    data = MNIST(str(tmp_path), download=False)
    assert len(data.validation_data) == 5000 and len(data.train_data) == 3
    np.testing.assert_allclose(data.train_data[..., 0], arrays["train_images"][5000:] / 255.0 - 0.5,
                               atol=1e-7)


def test_write_idx_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    path = str(tmp_path / "x-idx3-ubyte.gz")
    setup_mnist.write_idx(path, images)
    # What the writer produced is the standard layout (checked by hand here).
    assert gzip.decompress(open(path, "rb").read()) == idx_images_bytes(images)
    assert np.array_equal(setup_mnist.read_idx(path, setup_mnist.IDX_IMAGE_MAGIC), images)
    labels = rng.integers(0, 10, 9).astype(np.uint8)
    setup_mnist.write_idx(str(tmp_path / "l"), labels)
    assert open(tmp_path / "l", "rb").read() == idx_labels_bytes(labels)


def _swap(tmp_path, name, data, compress=True):
    write_bytes(os.path.join(tmp_path, name), data, compress)


@pytest.mark.parametrize("name, make, fragment", [
    ("train-images-idx3-ubyte.gz",
     lambda: idx_labels_bytes(np.zeros(12, np.uint8)), "magic number 2049, expected 2051"),
    ("t10k-labels-idx1-ubyte.gz",
     lambda: idx_images_bytes(np.zeros((7, 28, 28), np.uint8)), "magic number 2051, expected 2049"),
    ("train-images-idx3-ubyte.gz",
     lambda: idx_images_bytes(np.zeros((12, 28, 28), np.uint8))[:-100], "truncated"),
    ("train-labels-idx1-ubyte.gz", lambda: struct.pack(">I", 2049) + b"\x00\x00", "truncated"),
    ("train-labels-idx1-ubyte.gz", lambda: b"\x00\x00", "truncated"),
    ("t10k-images-idx3-ubyte.gz",
     lambda: idx_images_bytes(np.zeros((7, 28, 28), np.uint8)) + b"xyz", "3 bytes after"),
    ("t10k-images-idx3-ubyte.gz",
     lambda: idx_images_bytes(np.zeros((7, 27, 27), np.uint8)), "expected 28x28"),
    ("t10k-labels-idx1-ubyte.gz", lambda: idx_labels_bytes(np.zeros(6, np.uint8)), "6 labels for the 7"),
    ("train-labels-idx1-ubyte.gz", lambda: idx_labels_bytes(np.full(12, 10, np.uint8)), "label 10"),
])
def test_mnist_bad_files_name_the_file(tmp_path, name, make, fragment):
    make_mnist(tmp_path)
    _swap(tmp_path, name, make())
    with pytest.raises(ToolError) as err:
        MNIST(str(tmp_path), download=False, validation_size=5)
    message = str(err.value)
    assert os.path.join(str(tmp_path), name) in message
    assert fragment in message
    assert "\n" not in message


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ToolError, match="train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        MNIST(str(tmp_path), download=False, validation_size=5)


def test_missing_mnist_files_say_what_to_place_where(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(ToolError) as err:
        MNIST(str(folder), download=False)
    message = str(err.value)
    for name in setup_mnist.MNIST_FILES.values():
        assert name in message
    assert str(folder) in message and "place them in" in message

    make_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ToolError) as err:
        MNIST(str(tmp_path), download=False, validation_size=5)
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)
    assert "train-images-idx3-ubyte.gz" not in str(err.value)


def test_failed_download_is_reported_not_raised_as_traceback(tmp_path):
    # Port 9 (discard) on localhost refuses at once: a stand-in for "no network".
    with pytest.raises(ToolError) as err:
        MNIST(str(tmp_path), download=True, mirrors=("http://127.0.0.1:9/",))
    assert "download failed" in str(err.value)
    assert "place them in" in str(err.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")], "partial download left behind"


def test_too_few_training_images_for_validation(tmp_path):
    make_mnist(tmp_path, n_train=5)
    with pytest.raises(ToolError, match="only 5 training images"):
        MNIST(str(tmp_path), download=False, validation_size=5)


def test_mnist_cli_missing_folder_one_line(tmp_path):
    rc, out, err = cli("setup_mnist.py", "--data_dir", str(tmp_path / "missing"), "--no_download")
    assert_one_line_error(rc, err, "train-images-idx3-ubyte.gz", str(tmp_path / "missing"))
    assert out == ""


def test_mnist_cli_corrupt_file_one_line(tmp_path):
    make_mnist(tmp_path, n_train=5003, n_test=3)
    _swap(tmp_path, "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x04" + b"\x00" * 40)
    rc, out, err = cli("setup_mnist.py", "--data_dir", str(tmp_path), "--no_download")
    assert_one_line_error(rc, err, "t10k-images-idx3-ubyte.gz", "magic number 2052")


def test_mnist_cli_summary(tmp_path):
    make_mnist(tmp_path, n_train=5003, n_test=3)
    rc, out, err = cli("setup_mnist.py", "--data_dir", str(tmp_path), "--no_download")
    assert rc == 0, err
    assert out.strip() == ("[DATA] dataset = mnist, train = 3, validation = 5000, test = 3, "
                           "shape = 28x28x1, min = -0.5, max = 0.5")


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------
@pytest.mark.parametrize("subfolder", [setup_cifar.ARCHIVE_FOLDER, ""])
def test_cifar_reads_tiny_batches_exactly(tmp_path, subfolder):
    train_images, train_labels, test_images, test_labels = make_cifar(tmp_path / subfolder)
    data = CIFAR(str(tmp_path), download=False, validation_size=4)
    assert data.validation_data.shape == (4, 32, 32, 3)
    assert data.train_data.shape == (11, 32, 32, 3)
    assert data.test_data.shape == (4, 32, 32, 3)
    for arr in (data.train_data, data.validation_data, data.test_data):
        assert arr.dtype == np.float32 and arr.min() >= -0.5 and arr.max() <= 0.5
    expected = train_images / 255.0 - 0.5
    np.testing.assert_allclose(data.validation_data, expected[:4], atol=1e-7)
    np.testing.assert_allclose(data.train_data, expected[4:], atol=1e-7)
    np.testing.assert_allclose(data.test_data, test_images / 255.0 - 0.5, atol=1e-7)
    assert_one_hot(data.validation_labels, train_labels[:4])
    assert_one_hot(data.train_labels, train_labels[4:])
    assert_one_hot(data.test_labels, test_labels)


def test_cifar_channel_order_is_rgb_planes():
    # A record whose red plane is all 255, green 0, blue 128 -> pixel (0.5, -0.5, ~0.002).
    raw = bytes([3]) + b"\xff" * 1024 + b"\x00" * 1024 + b"\x80" * 1024
    images, labels = setup_cifar.parse_batch(raw, "x.bin")
    assert labels.tolist() == [3]
    assert images.shape == (1, 32, 32, 3)
    assert images[0, 5, 7].tolist() == [255, 0, 128]


def test_write_batch_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 9, 4])
    setup_cifar.write_batch(str(tmp_path / "b.bin"), images, labels)
    assert (tmp_path / "b.bin").read_bytes() == cifar_batch_bytes(images, labels)
    back_images, back_labels = setup_cifar.read_batch(str(tmp_path / "b.bin"))
    assert np.array_equal(back_images, images) and np.array_equal(back_labels, labels)


def test_cifar_truncated_batch_names_the_file(tmp_path):
    folder = tmp_path / setup_cifar.ARCHIVE_FOLDER
    make_cifar(folder)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ToolError) as err:
        CIFAR(str(tmp_path), download=False, validation_size=4)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_cifar_bad_label_names_the_file(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(bytes([12]) + b"\x00" * 3072)
    with pytest.raises(ToolError, match="test_batch.bin: corrupt file: label 12"):
        CIFAR(str(tmp_path), download=False, validation_size=4)


def test_cifar_missing_files_say_what_to_place_where(tmp_path):
    make_cifar(tmp_path / setup_cifar.ARCHIVE_FOLDER)
    os.remove(tmp_path / setup_cifar.ARCHIVE_FOLDER / "data_batch_5.bin")
    with pytest.raises(ToolError) as err:
        CIFAR(str(tmp_path), download=False)
    message = str(err.value)
    assert "missing: data_batch_5.bin;" in message
    assert os.path.join(str(tmp_path), setup_cifar.ARCHIVE_FOLDER) in message


def test_cifar_corrupt_archive_names_it(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(gzip.compress(b"not a tar file at all" * 50))
    with pytest.raises(ToolError, match="cifar-10-binary.tar.gz: corrupt CIFAR-10 archive"):
        CIFAR(str(tmp_path), download=True, urls=("http://127.0.0.1:9/cifar-10-binary.tar.gz",))


def test_cifar_cli_missing_folder_one_line(tmp_path):
    rc, out, err = cli("setup_cifar.py", "--data_dir", str(tmp_path / "missing"), "--no_download")
    assert_one_line_error(rc, err, "data_batch_1.bin", "test_batch.bin")


def test_cifar_run_cli_in_process(tmp_path, capsys):
    folder = tmp_path / setup_cifar.ARCHIVE_FOLDER
    make_cifar(folder)
    (folder / "test_batch.bin").write_bytes(b"\x01" * 100)
    rc = run_cli(setup_cifar.main, setup_cifar.parse_args,
                 ["--data_dir", str(tmp_path), "--no_download"], prog="setup_cifar.py")
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_batch.bin" in err and "truncated" in err


# --------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return Digits()


def test_digits_shapes_and_range(digits):
    assert digits.train_data.shape == (1257, 28, 28, 1)
    assert digits.validation_data.shape == (180, 28, 28, 1)
    assert digits.test_data.shape == (360, 28, 28, 1)
    for arr in (digits.train_data, digits.validation_data, digits.test_data):
        assert arr.dtype == np.float32
        assert arr.min() == -0.5 and arr.max() == 0.5
        # An MNIST-like zero border of 4 pixels.
        assert np.all(arr[:, :4] == -0.5) and np.all(arr[:, -4:] == -0.5)
        assert np.all(arr[:, :, :4] == -0.5) and np.all(arr[:, :, -4:] == -0.5)
    for labels, n in ((digits.train_labels, 1257), (digits.validation_labels, 180), (digits.test_labels, 360)):
        assert labels.shape == (n, 10) and labels.dtype == np.float32
        assert np.array_equal(labels.sum(axis=1), np.ones(n))


def test_digits_are_deterministic(digits):
    again = Digits()
    for attr in ("train_data", "train_labels", "validation_data", "validation_labels",
                 "test_data", "test_labels"):
        assert np.array_equal(getattr(digits, attr), getattr(again, attr)), attr


def test_digits_split_covers_the_real_images_without_overlap(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert len(bunch.images) == 1797
    parts = [digits.train_index, digits.validation_index, digits.test_index]
    joined = np.concatenate(parts)
    assert len(joined) == 1797 and len(np.unique(joined)) == 1797
    # Images and labels are those of the sklearn rows named by the index.
    assert np.array_equal(digits.test_labels.argmax(1), bunch.target[digits.test_index])
    assert np.array_equal(digits.train_labels.argmax(1), bunch.target[digits.train_index])
    np.testing.assert_array_equal(digits.test_data[:5], setup_mnist.resample_digits(bunch.images[digits.test_index[:5]]))
    # Stratified: every class in every part, in proportion (within one image).
    overall = np.bincount(bunch.target, minlength=10) / 1797
    for labels in (digits.train_labels, digits.validation_labels, digits.test_labels):
        counts = labels.sum(axis=0)
        assert np.all(np.abs(counts - overall * len(labels)) <= 1.0), counts


def test_resample_digits_keeps_the_picture():
    blank = np.zeros((1, 8, 8))
    assert np.all(setup_mnist.resample_digits(blank) == -0.5)
    full = np.full((1, 8, 8), 16.0)
    out = setup_mnist.resample_digits(full)[0, :, :, 0]
    assert np.all(out[4:24, 4:24] == 0.5) and out.sum() == pytest.approx(400 * 0.5 - (784 - 400) * 0.5)
    corner = np.zeros((1, 8, 8))
    corner[0, 0, 0] = 16.0
    out = setup_mnist.resample_digits(corner)[0, :, :, 0]
    bright = np.argwhere(out > 0)
    assert len(bright) and bright.max() < 9 and bright.min() >= 4  # the top-left of the 20x20 box
