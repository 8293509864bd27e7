"""Stage 1 on every ImageNet zoo entry (random weights, small inputs)."""
import glob
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

import collect_gradients
import common
import imagenet_zoo
import setup_imagenet as si

HEAVY = os.environ.get("CLEVER_HEAVY_TESTS") == "1"
# nasnet_large, and the deeper members of a family whose first member runs by default:
# the same builder, preprocessing and stage-1 path, only more blocks (about 95 s of the
# suite). tests/test_imagenet.py still builds each of them and checks its logits.
HEAVY_MODELS = {"nasnet_large", "resnet101", "resnet152", "resnet101_v2", "resnet152_v2",
                "densenet169", "densenet201"}
SEED = 1215


def _params():
    heavy = [pytest.mark.heavy,
             pytest.mark.skipif(not HEAVY, reason="heavy model; set CLEVER_HEAVY_TESTS=1 to run")]
    return [pytest.param(name, marks=heavy if name in HEAVY_MODELS else [])
            for name in si.KERAS_MODELS]


@pytest.mark.parametrize("name", _params())
def test_stage1_writes_a_valid_mat_for_each_zoo_model(name, tmp_path, monkeypatch):
    spec = si.KERAS_MODELS[name]
    size = spec.min_size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    # Stage 1 skips misclassified images: name the image after the class that this
    # randomly initialised network predicts for it, and hand stage 1 the same network.
    common.set_seed(SEED)
    model = si.get_model(name, "random", size)
    x = np.asarray(pixels, np.float32)[None] / 255.0 - 0.5
    predicted = int(np.argmax(model(x, training=False)))
    asked = []

    def built_model(*args, **kwargs):
        asked.append(args[:3])
        return model

    monkeypatch.setattr(imagenet_zoo, "get_model", built_model)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(pixels).save(images / f"{predicted + 1}.sample.png")  # names count from 1
    args = collect_gradients.parse_args([
        "-d", "imagenet", "-m", name, "--weights", "random", "--input_size", str(size),
        "--data_dir", str(images), "-N", "4", "-i", "3", "-b", "4", "-n", "1",
        "--targets", "top2", "--seed", str(SEED), "-s", str(tmp_path / "out"), "-q",
        "--no_progress"])
    assert args.batch_size == 4
    assert collect_gradients.main(args) == 0
    assert asked == [(name, "random", size)]
    files = glob.glob(str(tmp_path / "out" / f"imagenet_{name}" / "*.mat"))
    assert len(files) == 1, "the image must be classified as named and scored"
    d = scipy.io.loadmat(files[0])
    assert d["true_label"].item() == predicted and d["info"].item() == "top2"
    for key in ("G1_max", "G2_max", "Gi_max"):
        assert d[key].size == 3 and np.all(np.isfinite(d[key])) and np.all(d[key] >= 0)
    # Some randomly initialised nets at tiny inputs have dead units and zero gradients:
    # those batches must be counted in the file, never pass silently.
    assert (d["G2_max"] == 0).sum() == d["zero_batches"].item()
    assert np.all(d["Gi_max"] <= d["G2_max"] * (1 + 1e-6))
    assert np.all(d["G2_max"] <= d["G1_max"] * (1 + 1e-6))
    assert d["dim"].item() == size * size * 3 and d["pred"].size == spec.num_classes
    assert d["g_x0"].item() >= 0


def test_imagenet_default_batch_size_is_32():
    args = collect_gradients.parse_args(["-d", "imagenet", "-m", "mobilenet_v1_0.25"])
    assert args.batch_size == 32
    assert collect_gradients.parse_args(["-d", "digits"]).batch_size == 1024
