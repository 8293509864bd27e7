"""Model zoo: architectures, file names, saving/loading, training scripts.

The last tests train the four digits demo models once per session with the
default epochs (about two minutes on two cores) and check the accuracy
targets of the issue.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import models
import train_models
import train_nlayer
from common import ToolError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(28, 28, 1), (32, 32, 3)]


def batch(shape, n=3, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, *shape)).astype(np.float32)


def logits(model, x):
    return np.asarray(model(x, training=False))


def weight_shapes(model):
    return [tuple(w.shape) for w in model.weights]


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", models.MODEL_NAMES)
def test_every_architecture_outputs_logits(arch, shape):
    model = models.build_model(arch, shape)
    out = logits(model, batch(shape, n=5))
    assert out.shape == (5, 10) and out.dtype == np.float32
    # Logits, not probabilities: no softmax at the end.
    assert model.layers[-1].get_config().get("activation") in (None, "linear")
    assert not np.allclose(out.sum(axis=1), 1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", list(models.ACTIVATIONS))
def test_activation_variants_build(activation, shape):
    model = models.build_model("normal", shape, activation=activation)
    assert logits(model, batch(shape, n=2)).shape == (2, 10)


def test_seven_layer_cnn_matches_the_original():
    mnist = models.build_model("normal", (28, 28, 1))
    kinds = [type(layer).__name__ for layer in mnist.layers if type(layer).__name__ != "Activation"]
    assert kinds == ["InputLayer", "Conv2D", "Conv2D", "MaxPooling2D", "Conv2D", "Conv2D", "MaxPooling2D",
                     "Flatten", "Dense", "Dropout", "Dense", "Dense"]
    assert [s for s in weight_shapes(mnist) if len(s) == 4] == [
        (3, 3, 1, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
    # 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4: 4*4*64 = 1024 inputs to the first dense layer.
    assert [s for s in weight_shapes(mnist) if len(s) == 2] == [(1024, 200), (200, 200), (200, 10)]
    cifar = models.build_model("normal", (32, 32, 3))
    assert [s for s in weight_shapes(cifar) if len(s) == 2] == [(3200, 256), (256, 256), (256, 10)]
    assert [s[-1] for s in weight_shapes(cifar) if len(s) == 4] == [64, 64, 128, 128]
    two = models.build_model("2-layer", (28, 28, 1))
    assert [s for s in weight_shapes(two) if len(s) == 2] == [(784, 1024), (1024, 10)]


def test_dropout_only_in_training():
    model = models.build_model("normal", (28, 28, 1))
    x = batch((28, 28, 1))
    assert np.array_equal(logits(model, x), logits(model, x))
    assert not np.allclose(np.asarray(model(x, training=True)), logits(model, x))


def test_custom_activations_values():
    x = np.linspace(-5, 5, 101).astype(np.float32)
    np.testing.assert_allclose(np.asarray(models.brelu(x)), np.clip(x, 0, 1), atol=1e-7)
    np.testing.assert_allclose(np.asarray(models.arctan(x)), np.arctan(x), atol=1e-6)
    # Keras 2's hard sigmoid (slope 0.2), which the original models were trained with.
    np.testing.assert_allclose(np.asarray(models.hard_sigmoid(x)), np.clip(0.2 * x + 0.5, 0, 1), atol=1e-6)
    brelu_model = models.build_model("brelu", (28, 28, 1))
    hidden = [layer for layer in brelu_model.layers if type(layer).__name__ == "Activation"]
    assert hidden and all(layer.activation is models.brelu for layer in hidden)


# --------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, name, activation, expected", [
    ("mnist", "normal", "relu", "mnist.keras"),
    ("mnist", "normal", "tanh", "mnist_cnn_7layer_tanh.keras"),
    ("mnist", "distilled", "relu", "mnist-distilled-100.keras"),
    ("mnist", "brelu", "relu", "mnist_brelu.keras"),
    ("mnist", "2-layer", "relu", "mnist_2layer.keras"),
    ("cifar", "normal", "relu", "cifar.keras"),
    ("cifar", "normal", "arctan", "cifar_cnn_7layer_arctan.keras"),
    ("cifar", "distilled", "relu", "cifar-distilled-100.keras"),
    ("cifar", "brelu", "relu", "cifar_brelu.keras"),
    ("cifar", "2-layer", "relu", "cifar_2layer.keras"),
    ("digits", "normal", "relu", "digits.keras"),
    ("digits", "normal", "hard_sigmoid", "digits_cnn_7layer_hard_sigmoid.keras"),
    ("digits", "distilled", "relu", "digits-distilled-100.keras"),
    ("digits", "brelu", "relu", "digits_brelu.keras"),
    ("digits", "2-layer", "relu", "digits_2layer.keras"),
])
def test_models_path_uses_original_names(dataset, name, activation, expected):
    assert models.models_path(dataset, name, activation) == os.path.join("models", expected)
    assert models.models_path(dataset, name, activation, models_dir="/x") == os.path.join("/x", expected)


def test_models_path_accepts_a_file_stem(tmp_path):
    (tmp_path / "mnist_mlp_3layer_relu.keras").write_bytes(b"")
    assert models.models_path("mnist", "mnist_mlp_3layer_relu", models_dir=str(tmp_path)) == \
        str(tmp_path / "mnist_mlp_3layer_relu.keras")


def test_unknown_names_are_tool_errors(tmp_path):
    (tmp_path / "digits_mlp_3layer_relu.keras").write_bytes(b"")
    with pytest.raises(ToolError) as err:
        models.load_model("digits", "resnet", models_dir=str(tmp_path))
    message = str(err.value)
    assert "'resnet'" in message and "normal, distilled, brelu, 2-layer" in message
    assert "digits_mlp_3layer_relu" in message
    with pytest.raises(ToolError, match="--activation: unknown activation 'swish'"):
        models.models_path("mnist", "normal", "swish")
    with pytest.raises(ToolError, match="unknown data set 'svhn'; use one of mnist, cifar, digits"):
        models.load_dataset("svhn")


def test_missing_model_says_how_to_train_it(tmp_path):
    with pytest.raises(ToolError) as err:
        models.load_model("digits", "distilled", models_dir=str(tmp_path))
    assert str(tmp_path / "digits-distilled-100.keras") in str(err.value)
    assert f"python train_models.py --dataset digits --models distilled --models_dir {tmp_path}" in str(err.value)
    with pytest.raises(ToolError) as err:
        models.load_model("mnist", "normal", "tanh", models_dir=str(tmp_path))
    assert ("train_nlayer.py --model mnist --modeltype cnn --activation tanh "
            f"--models_dir {tmp_path} 32 32 64 64 200 200") in str(err.value)


def test_dataset_registry():
    assert set(models.DATASETS) == {"mnist", "cifar", "digits"}
    data = models.load_dataset("digits")
    assert data.test_data.shape[1:] == models.INPUT_SHAPES["digits"]


# --------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------
@pytest.mark.parametrize("arch, activation", [
    ("normal", "relu"), ("brelu", "relu"), ("2-layer", "relu"), ("normal", "arctan"),
    ("normal", "hard_sigmoid"), ("normal", "elu"),
])
def test_save_load_round_trip_identical_logits(tmp_path, arch, activation):
    model = models.build_model(arch, (28, 28, 1), activation=activation)
    path = models.models_path("digits", arch, activation, models_dir=str(tmp_path))
    models.save_model(model, path)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left
    loaded = models.load_model("digits", arch, activation, models_dir=str(tmp_path))
    x = batch((28, 28, 1))
    assert np.array_equal(logits(model, x), logits(loaded, x))
    # A plain Keras load, without any custom_objects, works too.
    import keras

    plain = keras.saving.load_model(path)
    assert np.array_equal(logits(model, x), logits(plain, x))


def test_compiled_model_saves_without_its_custom_loss(tmp_path):
    model = models.build_model("2-layer", (28, 28, 1))
    model.compile(optimizer="adam", loss=train_models.tempered_crossentropy(100.0))
    path = str(tmp_path / "m.keras")
    models.save_model(model, path)
    import keras

    x = batch((28, 28, 1))
    assert np.array_equal(logits(keras.saving.load_model(path), x), logits(model, x))


def _gradient(model, x):
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = model(xt)
        g = out[:, 0] - out[:, 3]
    return tape.gradient(g, xt).numpy()


@pytest.mark.parametrize("how", ["export", "tf_saved_model"])
def test_savedmodel_folder_via_model_path(tmp_path, how):
    import tensorflow as tf

    model = models.build_model("normal", (28, 28, 1), activation="arctan")
    folder = str(tmp_path / "my_savedmodel")
    if how == "export":
        model.export(folder, verbose=False)
    else:
        tf.saved_model.save(model, folder)
    loaded = models.load_model("mnist", model_path=folder)
    x = batch((28, 28, 1), n=4)
    np.testing.assert_allclose(logits(loaded, x), logits(model, x), rtol=1e-5, atol=1e-5)
    grad = _gradient(loaded, x)
    assert grad.shape == x.shape and np.abs(grad).sum() > 0
    np.testing.assert_allclose(grad, _gradient(model, x), rtol=1e-4, atol=1e-6)


def test_user_h5_and_keras_files_via_model_path(tmp_path):
    model = models.build_model("brelu", (28, 28, 1))
    x = batch((28, 28, 1))
    model.save(str(tmp_path / "user.h5"))
    model.save(str(tmp_path / "user.keras"))
    for name in ("user.h5", "user.keras"):
        loaded = models.load_model("digits", model_path=str(tmp_path / name))
        np.testing.assert_allclose(logits(loaded, x), logits(model, x), atol=1e-6)


def test_original_tools_extensionless_hdf5_file_is_found(tmp_path):
    model = models.build_model("normal", (28, 28, 1))
    model.save(str(tmp_path / "legacy.h5"))
    os.replace(tmp_path / "legacy.h5", tmp_path / "mnist")  # the original tool's models/mnist
    loaded = models.load_model("mnist", "normal", models_dir=str(tmp_path))
    x = batch((28, 28, 1))
    np.testing.assert_allclose(logits(loaded, x), logits(model, x), atol=1e-6)


@pytest.mark.parametrize("content", ["garbage", "truncated", "not_hdf5"])
def test_corrupt_model_file_is_a_tool_error(tmp_path, content):
    path = tmp_path / ("digits.keras" if content != "not_hdf5" else "user.h5")
    if content == "truncated":
        models.save_model(models.build_model("normal", (28, 28, 1)), str(path))
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ToolError) as err:
        if content == "not_hdf5":
            models.load_model("digits", model_path=str(path))
        else:
            models.load_model("digits", "normal", models_dir=str(tmp_path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_keras_file_that_fails_to_deserialize(tmp_path):
    import zipfile

    path = tmp_path / "broken.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", '{"class_name": "NoSuchLayer", "config": {}}')
        zf.writestr("metadata.json", '{"keras_version": "3.0.0"}')
    with pytest.raises(ToolError, match="broken.keras: cannot load the model"):
        models.load_model("mnist", model_path=str(path))


def test_wrong_output_or_input_shape_is_a_tool_error(tmp_path):
    import keras

    five = models.build_cnn((28, 28, 1), [8, 8], [16], num_classes=5)
    models.save_model(five, str(tmp_path / "five.keras"))
    with pytest.raises(ToolError, match=r"five.keras: the model outputs shape \[2, 5\].*expected \[batch, 10\]"):
        models.load_model("mnist", model_path=str(tmp_path / "five.keras"))
    cifar = models.build_model("2-layer", (32, 32, 3))
    models.save_model(cifar, str(tmp_path / "cifar_model.keras"))
    with pytest.raises(ToolError, match="cifar_model.keras: the model does not accept images of shape"):
        models.load_model("mnist", model_path=str(tmp_path / "cifar_model.keras"))
    assert isinstance(models.load_model("cifar", model_path=str(tmp_path / "cifar_model.keras")), keras.Model)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ToolError, match="not a TensorFlow SavedModel"):
        models.load_model("mnist", model_path=str(tmp_path / "folder"))
    with pytest.raises(ToolError, match="model file not found"):
        models.load_model("mnist", model_path=str(tmp_path / "nothing.keras"))


def test_a_final_softmax_is_removed_and_the_logits_scored(tmp_path, caplog):
    import keras

    base = models.build_model("2-layer", (28, 28, 1))
    probs = keras.Model(base.input, keras.layers.Softmax(name="probs")(base.output))
    models.save_model(probs, str(tmp_path / "probs.keras"))
    with caplog.at_level("WARNING", logger="clever.models"):
        model = models.load_model("mnist", model_path=str(tmp_path / "probs.keras"))
    assert "'probs'" in caplog.text and "logits" in caplog.text
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# train_nlayer.py
# --------------------------------------------------------------------------
def test_nlayer_cnn_is_the_normal_model_and_names_agree():
    args = train_nlayer.parse_args(["--model", "mnist", "--modeltype", "cnn", "--activation", "tanh",
                                    "--models_dir", "models", "32", "32", "64", "64", "200", "200"])
    assert train_nlayer.model_file(args) == models.models_path("mnist", "normal", "tanh")
    built = train_nlayer.build(args, (28, 28, 1))
    reference = models.build_model("normal", (28, 28, 1), activation="tanh")
    assert weight_shapes(built) == weight_shapes(reference)
    assert [type(layer).__name__ for layer in built.layers] == [type(layer).__name__ for layer in reference.layers]
    acts = {layer.get_config()["activation"] for layer in built.layers if type(layer).__name__ == "Activation"}
    assert acts == {"tanh"}

    args = train_nlayer.parse_args(["--model", "cifar", "--modeltype", "mlp", "1024", "512"])
    # The original's default folder models_training/
    assert train_nlayer.model_file(args) == os.path.join("models_training", "cifar_mlp_3layer_relu.keras")
    mlp = train_nlayer.build(args, (32, 32, 3))
    assert [s for s in weight_shapes(mlp) if len(s) == 2] == [(3072, 1024), (1024, 512), (512, 10)]


def test_nlayer_activation_choices_match_models():
    assert tuple(train_nlayer.ACTIVATION_NAMES) == tuple(models.ACTIVATIONS)


def test_nlayer_kernel_l2_is_an_l2_penalty():
    args = train_nlayer.parse_args(["--model", "digits", "--modeltype", "mlp", "--kernel_l2", "0.01", "16"])
    model = train_nlayer.build(args, (28, 28, 1))
    assert len(model.losses) == 2  # one L2 term per kernel (hidden and output layer)
    kernel = model.layers[2].kernel.numpy()
    assert float(model.losses[0]) == pytest.approx(0.01 * float((kernel ** 2).sum()), rel=1e-5)


def test_nlayer_trains_saves_and_refuses_to_overwrite(tmp_path, capsys):
    argv = ["--model", "digits", "--modeltype", "mlp", "--activation", "softplus", "--epochs", "3",
            "--models_dir", str(tmp_path), "64"]
    assert run_cli(train_nlayer.main, train_nlayer.parse_args, argv) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(r"\[TRAIN\] dataset = digits, model = digits_mlp_2layer_softplus, "
                         r"test_accuracy = (\d\.\d{4}), time = \d+\.\ds\n", out)
    assert match, out
    path = tmp_path / "digits_mlp_2layer_softplus.keras"
    assert path.is_file() and (tmp_path / "digits_mlp_2layer_softplus.json").is_file()
    # Loadable by its stem, as stage 1 would, with the accuracy printed.
    model = models.load_model("digits", "digits_mlp_2layer_softplus", models_dir=str(tmp_path))
    data = models.load_dataset("digits")
    assert models.accuracy(model, data.test_data, data.test_labels) == pytest.approx(float(match.group(1)), abs=1e-4)
    assert float(match.group(1)) > 0.5  # learnt something in 3 epochs

    before = path.read_bytes()
    assert run_cli(train_nlayer.main, train_nlayer.parse_args, argv, prog="train_nlayer.py") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"train_nlayer.py: error: {path}: model exists; pass --overwrite to train and replace it"
    assert path.read_bytes() == before


def test_nlayer_defaults_and_flags_as_the_original():
    args = train_nlayer.parse_args(["--model", "mnist", "10"])
    # The original: mlp, SGD lr 0.01 with decay (--wd) 1e-5, 50 epochs, batches of 256, models_training/
    assert (args.modeltype, args.optimizer, args.lr, args.wd, args.epochs, args.batch_size) == \
        ("mlp", "sgd", 0.01, 1e-5, 50, 256)
    assert args.models_dir == "models_training"
    args = train_nlayer.parse_args(["--model", "mnist", "--optimizer", "adam", "10"])
    assert (args.lr, args.wd) == (0.001, 0.0)
    args = train_nlayer.parse_args(["--model", "mnist", "--modelpath", "zoo", "--wd", "0.5", "10"])
    assert train_nlayer.model_file(args) == os.path.join("zoo", "mnist_mlp_2layer_relu.keras")
    # --wd is the original's learning-rate decay: lr / (1 + wd * t) after t batches.
    opt = train_nlayer.make_optimizer(args, 100)
    assert float(opt.learning_rate) == pytest.approx(0.01)
    opt.iterations.assign(4)
    assert float(opt._get_current_learning_rate()) == pytest.approx(0.01 / (1 + 0.5 * 4))
    args = train_nlayer.parse_args(["--model", "mnist", "--modelfile", "my/net", "10"])
    assert train_nlayer.model_file(args) == "my/net.keras"


@pytest.mark.parametrize("argv, fragment", [
    (["--modeltype", "cnn", "--dense", "3", "32", "10"], "--dense 3"),
    (["--modeltype", "mlp", "--epochs", "0", "10"], "--epochs must be positive"),
    (["--modeltype", "mlp", "--lr", "-0.5", "10"], "--lr must be positive"),
    (["--modeltype", "mlp", "--wd", "-0.1", "10"], "--wd must be non-negative"),
    (["--model", "digits", "32", "0", "10"], "layer size must be positive"),
])
def test_nlayer_bad_flags(argv, fragment, capsys):
    assert run_cli(train_nlayer.main, train_nlayer.parse_args, argv, prog="train_nlayer.py") == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


# --------------------------------------------------------------------------
# train_models.py
# --------------------------------------------------------------------------
def test_train_models_arguments():
    args = train_models.parse_args(["--dataset", "digits"])
    assert args.model_list == ["normal", "distilled", "brelu", "2-layer"]
    assert args.batch_size == 128 and args.seed == 1215 and args.temperature == 100.0
    assert args.epochs_per_model == {"normal": 12, "distilled": 12, "brelu": 12, "2-layer": 30}
    args = train_models.parse_args(["--dataset", "mnist", "--models", "brelu,normal,brelu", "--epochs", "3"])
    assert args.model_list == ["brelu", "normal"] and args.epochs_per_model == {"brelu": 3, "normal": 3}
    assert (args.optimizer, args.lr) == ("sgd", 0.01)  # the original's SGD for MNIST/CIFAR


@pytest.mark.parametrize("argv, fragment", [
    (["--models", "normal,resnet"], "--models: unknown model 'resnet'"),
    (["--models", ","], "--models is empty"),
    (["--epochs", "-2"], "--epochs must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
])
def test_train_models_bad_flags(argv, fragment, capsys):
    assert run_cli(train_models.main, train_models.parse_args, argv, prog="train_models.py") == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_train_models_missing_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_models.py"), "--dataset", "cifar",
                           "--data_dir", str(tmp_path), "--models_dir", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train_models.py: error: " in proc.stderr and "data_batch_1.bin" in proc.stderr
    assert proc.stdout == ""


def test_tempered_crossentropy():
    import keras

    logits_ = np.array([[200.0, 0.0, -100.0]], np.float32)
    target = np.array([[0.2, 0.5, 0.3]], np.float32)
    loss = float(np.asarray(train_models.tempered_crossentropy(100.0)(target, logits_))[0])
    z = logits_[0] / 100.0
    expected = -float(np.sum(target[0] * (z - np.log(np.exp(z).sum()))))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert isinstance(train_models.make_optimizer("sgd", 0.01, 10), keras.optimizers.SGD)


# --------------------------------------------------------------------------
# The digits demo models, trained once with the default epochs
# --------------------------------------------------------------------------
def test_digits_training_meets_accuracy_targets(trained_digits):
    res = trained_digits.results
    assert list(res) == ["normal", "distilled", "2-layer", "brelu"], trained_digits.stdout
    assert len(trained_digits.stdout.strip().splitlines()) == 4
    assert res["normal"][0] >= 0.95
    assert res["distilled"][0] >= 0.90
    assert res["2-layer"][0] >= 0.90
    assert res["brelu"][0] >= 0.90


def test_trained_files_load_and_reproduce_the_printed_accuracy(trained_digits, tmp_path_factory):
    from conftest import _run_wide

    data = models.load_dataset("digits")
    # Other xdist workers add models to this folder under its lock: list it holding the lock.
    with _run_wide(tmp_path_factory, "digits_models"):
        names = sorted(os.listdir(trained_digits.dir))
    for stem in ("digits", "digits-distilled-100", "digits-distilled-100_init", "digits_brelu", "digits_2layer"):
        assert stem + ".keras" in names and stem + ".json" in names
    assert not [n for n in names if n.startswith(".tmp")]
    for name, (acc, _) in trained_digits.results.items():
        model = models.load_model("digits", name, models_dir=trained_digits.dir)
        assert models.accuracy(model, data.test_data, data.test_labels) == pytest.approx(acc, abs=1e-4)


def test_distilled_model_has_temperature_sized_logits(trained_digits):
    # Trained on logits / 100, the distilled network's plain (T = 1) logits are
    # about 100 times larger than a normally trained network's: the margin
    # between its top two logits is far larger.
    data = models.load_dataset("digits")

    def median_margin(name):
        z = models.predict_logits(models.load_model("digits", name, models_dir=trained_digits.dir),
                                  data.test_data)
        top = np.sort(z, axis=1)
        return float(np.median(top[:, -1] - top[:, -2]))

    assert median_margin("distilled") > 10 * median_margin("normal")
