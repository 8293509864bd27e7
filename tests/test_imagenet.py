"""Tests of setup_imagenet.py: the Keras zoo, frozen graphs and the image loader.

No network and no pretrained weights here: zoo models are built with random
weights (at their smallest input size), Keras' download is replaced by a stub
that fails like an offline machine, frozen graphs are made from small Keras
models, and images are written by the tests.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import common
import setup_imagenet as si

HEAVY = os.environ.get("CLEVER_HEAVY_TESTS") == "1"
heavy = [pytest.mark.heavy,
         pytest.mark.skipif(not HEAVY, reason="heavy model; set CLEVER_HEAVY_TESTS=1 to run")]

#: Names the toolkit promises (issue 6) and the original tool's 18 graphs (docs/format.md).
REQUIRED_KERAS = ["resnet50", "resnet101", "resnet152", "resnet50_v2", "resnet101_v2",
                  "resnet152_v2", "inception_v3", "inception_resnet_v2", "mobilenet_v1_0.25",
                  "mobilenet_v1_0.5", "mobilenet_v1_1.0", "mobilenet_v2", "vgg16", "vgg19",
                  "densenet121", "densenet169", "densenet201", "nasnet_large", "nasnet_mobile",
                  "xception", "efficientnet_b0"]
ORIGINAL_FROZEN = ["resnet_v2_50", "resnet_v2_101", "resnet_v2_152", "inception_v1",
                   "inception_v2", "inception_v3", "inception_v4", "inception_resnet_v2",
                   "vgg_16", "vgg_19", "mobilenet_v1_025", "mobilenet_v1_050",
                   "mobilenet_v1_100", "alexnet", "densenet121_k32", "densenet169_k32",
                   "densenet161_k48", "nasnet_large"]

#: The keras.applications module whose preprocess_input each zoo entry must match.
#: Written out here, independently of the table, so a wrong mode in the table fails.
KERAS_MODULE = {
    "resnet50": "resnet", "resnet101": "resnet", "resnet152": "resnet",
    "resnet50_v2": "resnet_v2", "resnet101_v2": "resnet_v2", "resnet152_v2": "resnet_v2",
    "inception_v3": "inception_v3", "inception_resnet_v2": "inception_resnet_v2",
    "mobilenet_v1_0.25": "mobilenet", "mobilenet_v1_0.5": "mobilenet",
    "mobilenet_v1_1.0": "mobilenet", "mobilenet_v2": "mobilenet_v2",
    "vgg16": "vgg16", "vgg19": "vgg19", "densenet121": "densenet", "densenet169": "densenet",
    "densenet201": "densenet", "nasnet_large": "nasnet", "nasnet_mobile": "nasnet",
    "xception": "xception", "efficientnet_b0": "efficientnet",
}

HEAVY_MODELS = {"nasnet_large"}

#: One entry per keras.applications module checks the weight file name in the
#: default suite (each check builds the network at full size); the other
#: entries, which share their module's naming code, run with the heavy tests.
WEIGHT_NAME_CHECKS = {"resnet50", "resnet50_v2", "inception_v3", "inception_resnet_v2",
                      "mobilenet_v1_0.25", "mobilenet_v2", "vgg16", "densenet121",
                      "nasnet_mobile", "xception", "efficientnet_b0"}


def zoo_params(light=None):
    light = set(si.KERAS_MODELS) - HEAVY_MODELS if light is None else light
    return [pytest.param(name, marks=[] if name in light else heavy) for name in si.KERAS_MODELS]


@pytest.fixture
def fresh_keras():
    """Free each model's graph state afterwards: the zoo is large on 2 shared cores."""
    yield
    import keras

    keras.backend.clear_session()


def toolkit_images(n, size, seed=0):
    """Float32 [n, size, size, 3] in [-0.5, 0.5], including both ends of the range."""
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, size, size, 3)).astype(np.float32)
    x[0, 0, 0, :] = -0.5
    x[0, 0, 1, :] = 0.5
    return x


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
def test_tables_hold_required_models():
    assert set(REQUIRED_KERAS) <= set(si.KERAS_MODELS)
    assert set(KERAS_MODULE) == set(si.KERAS_MODELS)
    assert sorted(si.FROZEN_MODELS) == sorted(ORIGINAL_FROZEN)
    rows = si.list_models()
    assert len(rows) == len(si.KERAS_MODELS) + len(si.FROZEN_MODELS)
    for row in rows:
        assert row.input_size in (224, 227, 299, 331)
        assert row.num_classes == 1000 + int(row.background_class)
        assert isinstance(row.preprocess, si.Preprocess)
    # The original's 1000-output graphs are VGG, DenseNet and AlexNet; the rest have background.
    no_background = {r.name for r in si.FROZEN_MODELS.values() if not r.background_class}
    assert no_background == {"vgg_16", "vgg_19", "alexnet", "densenet121_k32",
                             "densenet169_k32", "densenet161_k48"}
    assert si.KERAS_MODELS["mobilenet_v1_0.5"].options == (("alpha", 0.5),)


def test_import_is_cheap():
    code = "import sys, setup_imagenet; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(si.__file__)))
    assert out.stdout.split() == ["False", "False"]


def test_list_models_cli(capsys):
    assert si.main(si.parse_args(["--list_models"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "kind", "input", "classes", "preprocessing", "source"]
    table = {(line.split()[0], line.split()[1]): line for line in lines[1:]}
    assert len(table) == len(si.KERAS_MODELS) + len(si.FROZEN_MODELS)
    assert "224x224" in table[("resnet50", "keras")] and "caffe" in table[("resnet50", "keras")]
    assert "keras.applications.MobileNet(alpha=0.25)" in table[("mobilenet_v1_0.25", "keras")]
    frozen_v3 = table[("inception_v3", "frozen")]
    assert "299x299" in frozen_v3 and "1001 (0 = background)" in frozen_v3
    assert "frozen_inception_v3.pb" in frozen_v3


def test_cli_errors_are_one_line(capsys):
    assert common.run_cli(si.main, si.parse_args, [], prog="setup_imagenet.py") == 2
    assert common.run_cli(si.main, si.parse_args, ["-m", "resnet9000"], prog="setup_imagenet.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "--list_models" in err[0]
    assert err[1].startswith("setup_imagenet.py: error: --model_name resnet9000: unknown")


# --------------------------------------------------------------------------
# The Keras zoo
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", zoo_params())
def test_zoo_model_preprocessing_and_logits(name, fresh_keras):
    import keras

    spec = si.KERAS_MODELS[name]
    size = spec.input_size if name in HEAVY_MODELS else spec.min_size
    model = si.get_model(name, "random", size)
    assert (model.image_size, model.num_classes, model.background_class) == (size, 1000, False)
    assert tuple(model.input_shape) == (None, size, size, 3)
    x = toolkit_images(2, size)

    # The preprocessing layer sits between the input and the network and gives
    # exactly Keras' preprocess_input of the 0..255 image.
    pre_layer = model.get_layer(si.PREPROCESS_LAYER)
    assert model.layers[1] is pre_layer
    got = np.asarray(keras.Model(model.input, pre_layer.output)(x))
    module = getattr(keras.applications, KERAS_MODULE[name])
    expected = module.preprocess_input(((x + 0.5) * 255.0).astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)

    # The output is the application's own output on the preprocessed images:
    # [N, 1000] logits, not probabilities.
    logits = np.asarray(model(x))
    assert logits.shape == (2, 1000)
    assert np.all(np.isfinite(logits))
    inner = model.layers[2]
    np.testing.assert_allclose(logits, np.asarray(inner(got)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    assert logits.min() < 0.0


@pytest.mark.parametrize("name", zoo_params(WEIGHT_NAME_CHECKS))
def test_imagenet_weights_offline_names_the_keras_file(name, monkeypatch, fresh_keras):
    """Offline and not cached: one ToolError naming the very file Keras asked for."""
    from keras.src.utils import file_utils

    asked = []

    def offline_get_file(fname=None, origin=None, **kwargs):
        asked.append(fname)
        raise Exception(f"URL fetch failure on {origin}: None -- offline (test)")

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    spec = si.KERAS_MODELS[name]
    with pytest.raises(common.ToolError) as err:
        si.get_model(name, "imagenet")
    # Built at the table's input size, Keras accepted it as the default for
    # ImageNet weights and asked for the file the table names.
    assert asked == [spec.weights_filename()]
    message = str(err.value)
    assert "\n" not in message
    assert asked[0] in message and si.keras_cache_dir() in message
    assert message.startswith(name + ":")


def test_mobilenet_imagenet_weights_by_input_size(monkeypatch, fresh_keras):
    from keras.src.utils import file_utils

    asked = []

    def offline_get_file(fname=None, origin=None, **kwargs):
        asked.append(fname)
        raise Exception(f"URL fetch failure on {origin}: None -- offline (test)")

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    with pytest.raises(common.ToolError, match="mobilenet_1_0_128_tf.h5"):
        si.get_model("mobilenet_v1_1.0", "imagenet", 128)
    assert asked == ["mobilenet_1_0_128_tf.h5"]
    # Other networks have ImageNet weights at their default size only.
    with pytest.raises(common.ToolError, match=r"^resnet50: cannot build at input size 64"):
        si.get_model("resnet50", "imagenet", 64)


def test_weights_from_file(tmp_path, fresh_keras):
    import keras

    app = keras.applications.MobileNet(alpha=0.25, weights=None, input_shape=(32, 32, 3),
                                       classifier_activation=None)
    path = str(tmp_path / "mobilenet_025.weights.h5")
    app.save_weights(path)
    model = si.get_model("mobilenet_v1_0.25", path, 32)
    x = toolkit_images(3, 32, seed=1)
    expected = app(keras.applications.mobilenet.preprocess_input((x + 0.5) * 255.0))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)

    bad = tmp_path / "broken.weights.h5"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.raises(common.ToolError, match="broken.weights.h5"):
        si.get_model("mobilenet_v1_0.25", str(bad), 32)
    with pytest.raises(common.ToolError, match=r"^--weights .*missing.h5: no such file"):
        si.get_model("mobilenet_v1_0.25", str(tmp_path / "missing.h5"), 32)
    with pytest.raises(common.ToolError, match="needs at least 75"):
        si.get_model("inception_v3", "random", 64)


def test_model_name_resolution(tmp_path):
    with pytest.raises(common.ToolError, match="unknown ImageNet model"):
        si.get_model("resnet9000", "random")
    # Names in both tables mean the Keras model unless a .pb or source says otherwise.
    assert isinstance(si.model_spec("inception_v3"), si.KerasSpec)
    assert isinstance(si.model_spec("inception_v3", "x/frozen_inception_v3.pb"), si.FrozenSpec)
    assert isinstance(si.model_spec("inception_v3", source="frozen"), si.FrozenSpec)
    assert isinstance(si.model_spec("resnet_v2_50"), si.FrozenSpec)
    with pytest.raises(common.ToolError, match="not a frozen model"):
        si.model_spec("resnet50", "model.pb")
    with pytest.raises(common.ToolError, match="--weights random: resnet_v2_50 is a frozen graph"):
        si.get_model("resnet_v2_50", "random")
    with pytest.raises(common.ToolError) as err:
        si.get_model("resnet_v2_50", models_dir=str(tmp_path))
    assert str(err.value) == (
        f"resnet_v2_50: frozen graph {tmp_path}/frozen_resnet_v2_50.pb not found; place the "
        f"original tool's frozen_resnet_v2_50.pb (from frozen_imagenet_models_v1.1.tar.gz) in "
        f"{tmp_path}/ or pass --models_dir DIR or --weights PATH.pb")
    with pytest.raises(common.ToolError, match="takes 224 x 224 images only"):
        si.get_model("resnet_v2_50", input_size=96, models_dir=str(tmp_path))


# --------------------------------------------------------------------------
# Frozen graphs
# --------------------------------------------------------------------------
def freeze(keras_model, size, path, logits_alias=None):
    """Write ``keras_model`` as a frozen binary GraphDef with input tensor ``input:0``.

    Returns the logits tensor name; ``logits_alias`` adds an Identity node of
    that name on the logits, to imitate a TF-slim graph's tensor names.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    function = tf.function(lambda x: keras_model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, size, size, 3], tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(function)
    graph_def = frozen.graph.as_graph_def()
    logits = frozen.outputs[0].name
    if logits_alias:
        node = graph_def.node.add()
        node.name, node.op = logits_alias, "Identity"
        node.input.append(logits.split(":")[0])
        node.attr["T"].type = tf.float32.as_datatype_enum
        logits = logits_alias + ":0"
    tf.io.write_graph(graph_def, os.path.dirname(path), os.path.basename(path), as_text=False)
    assert frozen.inputs[0].name == "input:0"
    return logits


def small_cnn(size, outputs, seed=3):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(8, 3, activation="tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(outputs)(h))


def logits_and_gradient(model, x, c, j, preprocess=None):
    """Logits and d(logit_c - logit_j)/dx, eagerly and inside a tf.function."""
    import tensorflow as tf

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(preprocess(x) if preprocess else x)
            margin = logits[:, c] - logits[:, j]
        return logits, tape.gradient(margin, x)

    x = tf.constant(x)
    eager = [np.asarray(t) for t in run(x)]
    graph = [np.asarray(t) for t in tf.function(run)(x)]
    return eager, graph


def assert_rel_close(got, expected, rel=1e-5):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=rel, atol=rel * scale)


def test_frozen_graph_matches_keras_logits_and_gradients(tmp_path, fresh_keras):
    size = 12
    keras_model = small_cnn(size, 1001)
    pb = str(tmp_path / "small.pb")
    logits_name = freeze(keras_model, size, pb)
    model = si.load_frozen_graph(pb, "input:0", logits_name, size, 1001, si.Preprocess.SLIM)
    assert (model.image_size, model.num_classes, model.background_class) == (size, 1001, True)
    x = toolkit_images(5, size, seed=2)
    (got, got_g), (graph, graph_g) = logits_and_gradient(model, x, 7, 100)
    (ref, ref_g), _ = logits_and_gradient(keras_model, x, 7, 100, preprocess=lambda t: 2.0 * t)
    assert got.shape == (5, 1001)
    assert_rel_close(got, ref)
    assert_rel_close(got_g, ref_g)
    assert_rel_close(graph, ref)
    assert_rel_close(graph_g, ref_g)

    # Dropping the background class: column 0 goes, labels 0..999.
    dropped = si.load_frozen_graph(pb, "input", logits_name, size, 1001, "slim",
                                   drop_background=True)
    assert (dropped.num_classes, dropped.background_class) == (1000, False)
    (d, d_g), _ = logits_and_gradient(dropped, x, 6, 99)
    assert_rel_close(d, ref[:, 1:])
    assert_rel_close(d_g, ref_g)


@pytest.mark.parametrize("mode", ["slim_vgg", "alexnet", "none"])
def test_frozen_graph_preprocessing_modes(mode, tmp_path, fresh_keras):
    """The original's VGG (RGB mean) and AlexNet (BGR mean) inputs, and identity."""
    size = 8
    keras_model = small_cnn(size, 10)
    pb = str(tmp_path / "small.pb")
    logits_name = freeze(keras_model, size, pb)
    model = si.load_frozen_graph(pb, "input", logits_name, size, 10, mode)
    x = toolkit_images(2, size, seed=4)
    x255 = (x + 0.5) * 255.0
    fed = {"slim_vgg": x255 - np.array([123.68, 116.78, 103.94], np.float32),
           "alexnet": x255[..., ::-1] - np.array([104.0, 117.0, 124.0], np.float32),
           "none": x}[mode]
    assert_rel_close(np.asarray(model(x)), np.asarray(keras_model(fed)))
    assert model.background_class is False


def test_frozen_graph_through_get_model(tmp_path, fresh_keras):
    """A graph with the original's tensor names loads by name from --models_dir."""
    spec = si.FROZEN_MODELS["inception_v3"]
    keras_model = small_cnn(spec.input_size, 1001)
    models_dir = tmp_path / "imagenet"
    models_dir.mkdir()
    pb = str(models_dir / spec.graph_file)
    freeze(keras_model, spec.input_size, pb, logits_alias=spec.logits_name.split(":")[0])
    x = toolkit_images(2, spec.input_size, seed=5)
    expected = np.asarray(keras_model(2.0 * x))
    by_dir = si.get_model("inception_v3", models_dir=str(models_dir), source="frozen")
    by_path = si.get_model("inception_v3", pb, drop_background=True)
    # The toolkit's layout <models_dir>/imagenet/<graph file> is searched too.
    by_parent = si.get_model("inception_v3", models_dir=str(tmp_path), source="frozen")
    assert_rel_close(np.asarray(by_parent(x)), expected)
    assert (by_dir.image_size, by_dir.num_classes, by_dir.background_class) == (299, 1001, True)
    assert_rel_close(np.asarray(by_dir(x)), expected)
    assert_rel_close(np.asarray(by_path(x)), expected[:, 1:])


def test_frozen_graph_errors(tmp_path, fresh_keras):
    size = 8
    pb = str(tmp_path / "small.pb")
    logits_name = freeze(small_cnn(size, 10), size, pb)
    with pytest.raises(common.ToolError, match=r"no logits tensor nope/logits:0 .*placeholders: input"):
        si.load_frozen_graph(pb, "input", "nope/logits", size, 10)
    with pytest.raises(common.ToolError, match="no input tensor missing:0"):
        si.load_frozen_graph(pb, "missing:0", logits_name, size, 10)
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\x00 this is not a protobuf \x13\x37" * 5)
    with pytest.raises(common.ToolError, match="garbage.pb: not a binary GraphDef"):
        si.load_frozen_graph(str(garbage), "input", logits_name, size, 10)
    with pytest.raises(common.ToolError, match="absent.pb: no such frozen graph file"):
        si.load_frozen_graph(str(tmp_path / "absent.pb"), "input", logits_name, size, 10)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
def test_crop_geometry():
    # Wide: height -> 10, width 90 * 10 / 30 = 30; centred 10-pixel crop.
    assert si.crop_geometry(90, 30, 10) == (30, 10, (10, 0, 20, 10))
    # Tall, odd size: width -> 9, height int(30 * 9 / 20) = 13; rows 2..10.
    assert si.crop_geometry(20, 30, 9) == (9, 13, (0, 2, 9, 11))
    # Truncation as the original: 500 x 333 at 224 -> int(336.33) = 336.
    assert si.crop_geometry(500, 333, 224) == (336, 224, (56, 0, 280, 224))
    # Float rounding made the original lose a pixel (55 * (224 / 55) < 224).
    assert int(55.0 * (224 / 55.0)) == 223
    assert si.crop_geometry(55, 55, 224) == (224, 224, (0, 0, 224, 224))


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def banded(width, height, across):
    """RGB uint8 image: red, green, blue bands; the green one holds the centre crop.

    Bands run across the long side: 1/6 red, 4/6 green, 1/6 blue, so a crop that
    is off centre, or not a crop at all, shows red or blue.
    """
    img = np.zeros((height, width, 3), np.uint8)
    length = width if across else height
    band = np.zeros((length, 3), np.uint8)
    band[:length // 6], band[length // 6:length - length // 6], band[length - length // 6:] = RED, GREEN, BLUE
    img[:] = band[None, :, :] if across else band[:, None, :]
    return img


def save(path, array):
    from PIL import Image

    Image.fromarray(array).save(path, quality=95) if str(path).endswith(".jpg") else \
        Image.fromarray(array).save(path)


@pytest.mark.parametrize("ext,tol", [(".png", 0.0), (".jpg", 6 / 255)])
def test_loader_crop_and_range(ext, tol, tmp_path):
    from PIL import Image

    save(tmp_path / f"1.wide{ext}", banded(90, 30, across=True))
    save(tmp_path / f"2.tall{ext}", banded(30, 90, across=False))
    data = si.ImageNet(str(tmp_path), 10)
    assert data.test_data.shape == (2, 10, 10, 3) and data.test_data.dtype == np.float32
    green = np.array([-0.5, 0.5, -0.5], np.float32)
    for image in data.test_data:
        np.testing.assert_allclose(image, np.broadcast_to(green, image.shape), atol=tol)
    assert data.test_data.min() >= -0.5 and data.test_data.max() <= 0.5
    # A plain resize (no crop) keeps the red and blue bands: the check can fail.
    squashed = np.asarray(Image.open(tmp_path / f"1.wide{ext}").convert("RGB").resize((10, 10)))
    assert squashed[:, 0, 0].min() > 200 and squashed[:, -1, 2].min() > 200


def test_loader_labels_order_and_selection(tmp_path):
    # Each image is one grey level so the order can be read back from the data.
    for label, level in [(3, 30), (1, 10), (2, 20), (1000, 40)]:
        save(tmp_path / f"{label}.n0{label}.png", np.full((12, 16, 3), level, np.uint8))
    save(tmp_path / "7.grey.jpg", np.full((16, 12), 70, np.uint8))  # mode L -> RGB
    (tmp_path / "README.txt").write_text("not an image")
    data = si.ImageNet(str(tmp_path), 8)
    # Sorted by file name: "1.", "1000.", "2.", "3.", "7.".
    assert data.files == ["1.n01.png", "1000.n01000.png", "2.n02.png", "3.n03.png", "7.grey.jpg"]
    np.testing.assert_array_equal(data.ids, np.arange(5))
    levels = np.round((data.test_data.mean(axis=(1, 2)) + 0.5) * 255).astype(int)
    np.testing.assert_array_equal(levels[:4], [[10] * 3, [40] * 3, [20] * 3, [30] * 3])
    assert abs(levels[4] - 70).max() <= 2
    # Names count classes from 1 (the original's subset): 1000 classes, columns 0..999.
    assert data.test_labels.shape == (5, 1000) and data.test_labels.dtype == np.float32
    np.testing.assert_array_equal(np.argmax(data.test_labels, axis=1), [0, 999, 1, 2, 6])
    np.testing.assert_array_equal(data.test_labels.sum(axis=1), np.ones(5))
    # With a background column (1001-output graphs) a name's label is its column.
    bg = si.ImageNet(str(tmp_path), 8, num_images=2, first=2, background_class=True)
    assert bg.files == ["2.n02.png", "3.n03.png"] and bg.test_labels.shape == (2, 1001)
    np.testing.assert_array_equal(np.argmax(bg.test_labels, axis=1), [2, 3])
    np.testing.assert_array_equal(bg.ids, [2, 3])
    np.testing.assert_array_equal(bg.test_data, data.test_data[2:4])


def test_loader_labels_file(tmp_path):
    for fname, level in [("ILSVRC2012_val_00000002.JPEG", 50), ("ILSVRC2012_val_00000001.JPEG", 60),
                         ("sub dir.png", 70)]:
        save(tmp_path / fname.replace(".JPEG", ".jpg"), np.full((10, 10, 3), level, np.uint8))
        if fname.endswith(".JPEG"):
            os.replace(tmp_path / fname.replace(".JPEG", ".jpg"), tmp_path / fname)
    labels = tmp_path / "val.txt"
    labels.write_text("# ILSVRC2012 ground truth, classes from 0\n"
                      "ILSVRC2012_val_00000002.JPEG 970\n\n"
                      "ILSVRC2012_val_00000001.JPEG 65\n"
                      "sub dir.png 0\n")
    data = si.ImageNet(str(tmp_path), 6, labels_file=str(labels))
    assert data.files == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "sub dir.png"]
    np.testing.assert_array_equal(np.argmax(data.test_labels, axis=1), [65, 970, 0])
    one_based = si.ImageNet(str(tmp_path), 6, labels_file=str(labels), label_base=1,
                            background_class=True, num_images=2)
    np.testing.assert_array_equal(np.argmax(one_based.test_labels, axis=1), [65, 970])


def test_loader_errors(tmp_path):
    with pytest.raises(common.ToolError, match="--data_dir .*nowhere: no such folder"):
        si.ImageNet(str(tmp_path / "nowhere"), 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(common.ToolError, match="empty: no images"):
        si.ImageNet(str(empty), 8)

    folder = tmp_path / "imgs"
    folder.mkdir()
    save(folder / "1.ok.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "2.broken.jpg").write_bytes(b"\xff\xd8 truncated nonsense")
    with pytest.raises(common.ToolError, match=r"2\.broken\.jpg: cannot read image"):
        si.ImageNet(str(folder), 8)
    assert si.ImageNet(str(folder), 8, num_images=1).files == ["1.ok.png"]
    with pytest.raises(common.ToolError, match="--firstimg 5: .* has only 2 images"):
        si.ImageNet(str(folder), 8, first=5)

    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    save(unnamed / "cat.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(common.ToolError, match="cat.png: name does not start with a label"):
        si.ImageNet(str(unnamed), 8)
    zero = tmp_path / "zero"
    zero.mkdir()
    save(zero / "0.zero.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(common.ToolError, match="0.zero.png: label 0 is outside 1..1000"):
        si.ImageNet(str(zero), 8)

    labels = tmp_path / "labels.txt"
    labels.write_text("cat.png 3\ncat.png three\n")
    with pytest.raises(common.ToolError, match=r"labels.txt:2: expected '<file name> <label>'"):
        si.ImageNet(str(unnamed), 8, labels_file=str(labels))
    labels.write_text("dog.png 3\n")
    with pytest.raises(common.ToolError, match=r"labels.txt:1: .*dog.png does not exist"):
        si.ImageNet(str(unnamed), 8, labels_file=str(labels))
    with pytest.raises(common.ToolError, match="--labels_file .*absent.txt: no such file"):
        si.ImageNet(str(unnamed), 8, labels_file=str(tmp_path / "absent.txt"))


def test_cli_classifies_a_folder(tmp_path, capsys, fresh_keras):
    for label in (5, 9):
        save(tmp_path / f"{label}.img.png", np.full((40, 50, 3), 20 * label, np.uint8))
    args = si.parse_args(["-m", "mobilenet_v1_0.25", "--weights", "random", "--input_size", "32",
                          "--data_dir", str(tmp_path)])
    assert si.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[IMAGENET] model = mobilenet_v1_0.25, input = 32x32x3, classes = 1000")
    assert out[1].startswith("[IMAGENET] id = 0, file = 5.img.png, true_label = 4, predicted = ")
    assert out[2].startswith("[IMAGENET] id = 1, file = 9.img.png, true_label = 8, predicted = ")
    assert out[3].startswith("[IMAGENET] top1 = ") and out[3].endswith("of 2)")


# --------------------------------------------------------------------------
# What collect_gradients.py --dataset imagenet calls
# --------------------------------------------------------------------------
def stage1_args(**overrides):
    """The keywords collect_gradients.py gives load_for_stage1, with its defaults."""
    values = dict(model_name="mobilenet_v1_0.25", weights="random", models_dir="models",
                  data_dir="data", model_path=None, firstimg=0, numimg=10, ids="")
    values.update(overrides)
    return values


def test_load_for_stage1_zoo_model(tmp_path, fresh_keras):
    folder = tmp_path / "imagenet"  # found under --data_dir
    folder.mkdir()
    for label in (4, 2, 9, 7):
        save(folder / f"{label}.x.png", np.full((20, 24, 3), 25 * label, np.uint8))
    args = stage1_args(data_dir=str(tmp_path), input_size=32, firstimg=1, numimg=2)
    model, data, label_offset = si.load_for_stage1(**args)
    assert (model.image_size, model.num_classes, label_offset) == (32, 1000, 0)
    # Ids are positions in the sorted folder: images 0..2 are loaded, 1 and 2 examined.
    assert data.files == ["2.x.png", "4.x.png", "7.x.png"]
    assert data.test_data.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(np.argmax(data.test_labels, axis=1), [1, 3, 6])
    everything = si.load_for_stage1(**stage1_args(data_dir=str(folder), input_size=32, ids="x.csv"))
    assert len(everything[1].files) == 4


def test_load_for_stage1_frozen_and_user_models(tmp_path, fresh_keras):
    spec = si.FROZEN_MODELS["mobilenet_v1_025"]
    keras_model = small_cnn(spec.input_size, 1001)
    pb = str(tmp_path / "mine.pb")
    freeze(keras_model, spec.input_size, pb, logits_alias=spec.logits_name.split(":")[0])
    save(tmp_path / "1.a.png", np.zeros((30, 30, 3), np.uint8))
    model, data, label_offset = si.load_for_stage1(
        **stage1_args(model_name="mobilenet_v1_025", model_path=pb, data_dir=str(tmp_path)))
    assert (model.image_size, model.num_classes, label_offset) == (224, 1001, 1)
    assert data.test_labels.shape == (1, 1000) and data.test_labels[0, 0] == 1.0
    _, _, offset = si.load_for_stage1(**stage1_args(
        model_name="mobilenet_v1_025", model_path=pb, data_dir=str(tmp_path), drop_background=True))
    assert offset == 0

    own = str(tmp_path / "own.keras")
    small_cnn(16, 10).save(own)
    model, data, label_offset = si.load_for_stage1(
        **stage1_args(model_name="own", model_path=own, data_dir=str(tmp_path)))
    assert (model.image_size, model.num_classes, label_offset) == (16, 10, 0)
    assert data.test_data.shape == (1, 16, 16, 3)
    # A zoo model saved to a file reloads with its preprocessing layer.
    zoo = si.get_model("mobilenet_v1_0.25", "random", 32)
    zoo.save(str(tmp_path / "zoo.keras"))
    again = si.load_user_model(str(tmp_path / "zoo.keras"))
    x = toolkit_images(2, 32, seed=6)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(zoo(x)), rtol=1e-5, atol=1e-5)
    assert (again.image_size, again.num_classes, again.background_class) == (32, 1000, False)
    with pytest.raises(common.ToolError, match="--model_path .*absent.keras: no such file"):
        si.load_for_stage1(**stage1_args(model_path=str(tmp_path / "absent.keras")))
