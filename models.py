"""The original tool's model zoo for MNIST, CIFAR-10 and digits, in Keras 3.

Every model outputs logits [batch, num_classes] (no softmax): CLEVER takes
gradients of logit differences (docs/format.md).

* Architectures (docs/format.md): ``normal`` is the 7-layer CNN (3x3 valid
  convolutions 32, 32, pool, 64, 64, pool, dense 200, dropout 0.5, dense 200,
  dense 10; CIFAR: 64, 64, 128, 128, 256, 256) with activation relu, tanh,
  sigmoid, elu, softplus, hard_sigmoid or arctan; ``distilled`` is the same
  network after defensive distillation at T = 100; ``brelu`` uses ReLU
  bounded at 1; ``2-layer`` has one hidden layer of 1024 softplus units.
  :func:`build_mlp` and :func:`build_cnn` build the n-layer networks of
  ``train_nlayer.py``.
* Files: Keras 3 ``.keras`` files under ``models/`` named as the original
  tool's (:func:`models_path`): ``mnist``, ``mnist-distilled-100``,
  ``mnist_brelu``, ``mnist_2layer``, ``mnist_cnn_7layer_tanh``, likewise
  ``cifar*`` and ``digits*``.
* Data sets: :data:`DATASETS` and :func:`load_dataset` name the loaders.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from typing import Callable, Sequence

import keras
import numpy as np
from keras import layers, ops

from common import ToolError

log = logging.getLogger("clever.models")

NUM_CLASSES = 10
#: Defensive distillation temperature of the original ``*-distilled-100`` models.
DISTILLATION_TEMPERATURE = 100


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------
def _mnist(data_dir="data", download=True):
    from setup_mnist import MNIST

    return MNIST(data_dir, download=download)


def _cifar(data_dir="data", download=True):
    from setup_cifar import CIFAR

    return CIFAR(data_dir, download=download)


def _digits(data_dir="data", download=True):
    from setup_mnist import Digits

    return Digits(data_dir, download=download)


#: Data set name -> loader(data_dir, download) returning an object with
#: train_data/train_labels/validation_data/validation_labels/test_data/test_labels.
DATASETS: dict[str, Callable] = {"mnist": _mnist, "cifar": _cifar, "digits": _digits}

#: Input shape (H, W, C) of each data set's images.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (28, 28, 1), "cifar": (32, 32, 3), "digits": (28, 28, 1)}


def check_dataset(name: str) -> str:
    """Return ``name`` if it is a known data set, else raise a ToolError listing them."""
    if name not in DATASETS:
        raise ToolError(f"--dataset: unknown data set {name!r}; use one of {', '.join(DATASETS)}")
    return name


def load_dataset(name: str, data_dir: str = "data", download: bool = True):
    """Load data set ``name`` (mnist, cifar, digits); images [N, H, W, C] float32 in [-0.5, 0.5]."""
    return DATASETS[check_dataset(name)](data_dir, download=download)


# --------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------
# Registered so that saved models load without custom_objects.
@keras.saving.register_keras_serializable(package="clever")
def arctan(x):
    """Element-wise arctan, an activation of the original train_nlayer.py."""
    return ops.arctan(x)


@keras.saving.register_keras_serializable(package="clever")
def brelu(x):
    """ReLU bounded at 1: min(max(x, 0), 1) (the original ``brelu`` models)."""
    return ops.minimum(ops.relu(x), 1.0)


@keras.saving.register_keras_serializable(package="clever")
def hard_sigmoid(x):
    """Keras 2's hard sigmoid clip(0.2 x + 0.5, 0, 1), as the original tool trained with.

    Keras 3's built-in ``hard_sigmoid`` has slope 1/6 instead, which would
    change the models and their Lipschitz constants.
    """
    return ops.clip(0.2 * x + 0.5, 0.0, 1.0)


#: --activation name -> Keras activation (a built-in name or a registered function).
ACTIVATIONS: dict[str, object] = {
    "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "elu": "elu",
    "softplus": "softplus", "hard_sigmoid": hard_sigmoid, "arctan": arctan,
}
#: Activations of models that are not chosen with --activation.
_INTERNAL_ACTIVATIONS: dict[str, object] = {"brelu": brelu}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ToolError(f"--activation: unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return name


def _activation(name: str):
    if name in _INTERNAL_ACTIVATIONS:
        return _INTERNAL_ACTIVATIONS[name]
    return ACTIVATIONS[check_activation(name)]


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------
#: Conv channels and dense units of the 7-layer CNN by input channels (1: MNIST/digits, 3: CIFAR).
CNN_7LAYER: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    1: ((32, 32, 64, 64), (200, 200)),
    3: ((64, 64, 128, 128), (256, 256)),
}
#: Hidden units of the "2-layer" model and its activation.
TWO_LAYER_UNITS = 1024
TWO_LAYER_ACTIVATION = "softplus"


def _regularizer(weight_decay: float):
    return keras.regularizers.L2(weight_decay) if weight_decay else None


def build_cnn(input_shape: Sequence[int], conv_channels: Sequence[int], dense_units: Sequence[int],
              num_classes: int = NUM_CLASSES, activation: str = "relu", dropout: float = 0.5,
              weight_decay: float = 0.0, name: str | None = None) -> keras.Model:
    """A CNN in the original tool's style -> logits [batch, num_classes].

    3x3 valid convolutions with ``conv_channels`` filters, a 2x2 max pooling
    after every second convolution, flatten, dense layers of ``dense_units``
    with dropout (training only) after the first, and a linear output layer.
    ``weight_decay`` is the L2 penalty coefficient on kernels.
    """
    act, reg = _activation(activation), _regularizer(weight_decay)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for i, channels in enumerate(conv_channels):
        x = layers.Conv2D(channels, (3, 3), padding="valid", kernel_regularizer=reg)(x)
        x = layers.Activation(act)(x)
        if i % 2 == 1:
            x = layers.MaxPooling2D(pool_size=(2, 2))(x)
    x = layers.Flatten()(x)
    for i, units in enumerate(dense_units):
        x = layers.Dense(units, kernel_regularizer=reg)(x)
        x = layers.Activation(act)(x)
        if i == 0 and dropout:
            x = layers.Dropout(dropout)(x)
    logits = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def build_mlp(input_shape: Sequence[int], hidden_units: Sequence[int], num_classes: int = NUM_CLASSES,
              activation: str = "relu", weight_decay: float = 0.0, name: str | None = None) -> keras.Model:
    """Flatten, dense layers of ``hidden_units`` with ``activation``, linear output -> logits."""
    act, reg = _activation(activation), _regularizer(weight_decay)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Flatten()(inputs)
    for units in hidden_units:
        x = layers.Dense(units, kernel_regularizer=reg)(x)
        x = layers.Activation(act)(x)
    logits = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


#: Architectures selectable by name (--models / --model_name).
MODEL_NAMES: tuple[str, ...] = ("normal", "distilled", "brelu", "2-layer")


def check_model_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ToolError(f"--models: unknown model {name!r}; use any of {', '.join(MODEL_NAMES)}")
    return name


def build_model(arch: str, input_shape: Sequence[int], num_classes: int = NUM_CLASSES,
                activation: str = "relu", weight_decay: float = 0.0,
                name: str | None = None) -> keras.Model:
    """A fresh (untrained) model of architecture ``arch`` -> logits [batch, num_classes].

    ``arch``: normal (7-layer CNN with ``activation``), distilled (the same
    network; distillation is a way of training it), brelu (ReLU bounded at 1),
    2-layer (1024 softplus units). ``activation`` only applies to ``normal``.
    ``input_shape`` is (28, 28, 1) for MNIST/digits or (32, 32, 3) for CIFAR
    (other channel counts use the MNIST sizes).
    """
    check_model_name(arch)
    if arch == "2-layer":
        return build_mlp(input_shape, [TWO_LAYER_UNITS], num_classes, TWO_LAYER_ACTIVATION,
                         weight_decay, name)
    convs, dense = CNN_7LAYER.get(int(input_shape[-1]), CNN_7LAYER[1])
    act = {"normal": activation, "distilled": "relu", "brelu": "brelu"}[arch]
    return build_cnn(input_shape, convs, dense, num_classes, act, 0.5, weight_decay, name)


# --------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------
MODEL_EXT = ".keras"


def nlayer_stem(dataset: str, modeltype: str, nlayers: int, activation: str) -> str:
    """File stem of a train_nlayer.py model, e.g. ``mnist_cnn_7layer_tanh``."""
    return f"{dataset}_{modeltype}_{nlayers}layer_{activation}"


def model_stem(dataset: str, model_name: str, activation: str = "relu") -> str:
    """The original tool's file stem of a named model (``mnist``, ``mnist-distilled-100``...)."""
    check_model_name(model_name)
    if model_name == "normal":
        check_activation(activation)
        return dataset if activation == "relu" else nlayer_stem(dataset, "cnn", 7, activation)
    if activation != "relu":
        log.warning("--activation %s is ignored for model %s (its activation is fixed)",
                    activation, model_name)
    return {"distilled": f"{dataset}-distilled-{DISTILLATION_TEMPERATURE}",
            "brelu": f"{dataset}_brelu", "2-layer": f"{dataset}_2layer"}[model_name]


def _model_files(models_dir: str) -> list[str]:
    try:
        names = os.listdir(models_dir)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith(".")
                  and (n.endswith((MODEL_EXT, ".h5")) or os.path.isdir(os.path.join(models_dir, n))))


def models_path(dataset: str, model_name: str, activation: str = "relu", models_dir: str = "models") -> str:
    """Path of a model file: ``models/<stem>.keras``.

    ``model_name`` is one of normal, distilled, brelu, 2-layer (the file name
    follows the original tool, e.g. ("mnist", "normal", "tanh") ->
    models/mnist_cnn_7layer_tanh.keras), or the stem of a file (or SavedModel
    folder) under ``models_dir`` such as ``mnist_mlp_3layer_relu``. The file
    of a named model need not exist yet; an unknown name is a ToolError.
    """
    if model_name in MODEL_NAMES:
        return os.path.join(models_dir, model_stem(dataset, model_name, activation) + MODEL_EXT)
    for candidate in (model_name + MODEL_EXT, model_name + ".h5", model_name):
        path = os.path.join(models_dir, candidate)
        if os.path.exists(path) and (candidate != model_name or os.path.isdir(path)):
            return path
    stems = [os.path.splitext(n)[0] if not os.path.isdir(os.path.join(models_dir, n)) else n
             for n in _model_files(models_dir)]
    found = f" or a model in {models_dir}/ ({', '.join(stems)})" if stems else \
        f" or the name of a model file in {models_dir}/"
    raise ToolError(f"--model_name: unknown model {model_name!r}; use one of "
                    f"{', '.join(MODEL_NAMES)}{found}")


def _train_hint(dataset: str, model_name: str, activation: str, models_dir: str) -> str:
    if model_name == "normal" and activation != "relu":
        convs, dense = CNN_7LAYER[INPUT_SHAPES.get(dataset, (0, 0, 1))[-1]]
        sizes = " ".join(str(s) for s in convs + dense)
        return (f"python train_nlayer.py --model {dataset} --modeltype cnn "
                f"--activation {activation} --models_dir {models_dir} {sizes}")
    return f"python train_models.py --dataset {dataset} --models {model_name} --models_dir {models_dir}"


# --------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------
def save_model(model: keras.Model, path: str) -> None:
    """Save ``model`` as a Keras 3 file at ``path`` (must end in .keras), atomically.

    Written under a temporary name in the same folder, then renamed, so a
    crash never leaves a half-written model. The optimizer state and training
    configuration are not stored: the file holds the inference model only.
    """
    if not path.endswith(MODEL_EXT):
        raise ToolError(f"{path}: model files are saved as Keras 3 {MODEL_EXT} files")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=MODEL_EXT, dir=folder)
    os.close(fd)
    try:
        inference = model
        if model.compiled:
            # A compiled model would store its (maybe custom) loss; loading
            # then needs that loss. Save a clean copy with the same weights.
            inference = type(model).from_config(model.get_config())
            inference.set_weights(model.get_weights())
        inference.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_keras_file(path: str) -> keras.Model:
    if path.endswith(MODEL_EXT) and not zipfile.is_zipfile(path):
        raise ToolError(f"{path}: corrupt or truncated model file (a .keras file is a zip archive); "
                        "train or copy it again")
    if path.endswith((".h5", ".hdf5")) and not _is_hdf5(path):
        raise ToolError(f"{path}: corrupt model file (not an HDF5 file); train or copy it again")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any failure to load is the user's file's problem
        raise ToolError(f"{path}: cannot load the model ({_error_line(err)})") from None


def _load_legacy_hdf5(path: str) -> keras.Model:
    """A Keras 2 HDF5 model file without extension, as the original tool saved (``models/mnist``)."""
    folder = tempfile.mkdtemp(prefix="clever-h5-")
    try:
        link = os.path.join(folder, "model.h5")
        os.symlink(os.path.abspath(path), link)
        return _load_keras_file(link)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class SavedModelLogits(layers.Layer):
    """Calls a TensorFlow SavedModel's function on a batch and returns its logits.

    Differentiable: gradients flow through the restored concrete function.
    Not meant to be saved again (the SavedModel folder is the model).
    """

    def __init__(self, function, input_key: str | None, output_key: str | None, num_outputs: int, **kw):
        super().__init__(trainable=False, **kw)
        self._function = function
        self._input_key = input_key
        self._output_key = output_key
        self._num_outputs = num_outputs

    def call(self, x):
        out = self._function(**{self._input_key: x}) if self._input_key else self._function(x)
        if isinstance(out, dict):
            out = out[self._output_key]
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self._num_outputs)


def _load_savedmodel(path: str, input_shape: Sequence[int] | None) -> keras.Model:
    """Wrap a TensorFlow SavedModel folder as a Keras model: images -> logits."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"{path}: cannot load the SavedModel ({_error_line(err)})") from None
    signature = getattr(loaded, "signatures", {}).get("serving_default")
    if signature is not None:
        specs = signature.structured_input_signature[1]
        if len(specs) != 1:
            raise ToolError(f"{path}: the serving_default signature takes {len(specs)} inputs "
                            f"({', '.join(specs)}); CLEVER needs a model of one image batch")
        input_key, spec = next(iter(specs.items()))
        outputs = signature.structured_outputs
        if len(outputs) == 1:
            output_key = next(iter(outputs))
        elif "logits" in outputs:
            output_key = "logits"
        else:
            raise ToolError(f"{path}: the serving_default signature has outputs {', '.join(outputs)}; "
                            "name the logits output 'logits'")
        function, out_spec = signature, outputs[output_key]
        shape = spec.shape
    elif callable(loaded) and getattr(loaded.__call__, "concrete_functions", None):
        # A tf.Module saved with a traced __call__ (no serving signature).
        concrete = loaded.__call__.concrete_functions[0]
        function, input_key, output_key = loaded.__call__, None, None
        shape = concrete.structured_input_signature[0][0].shape
        out_spec = concrete.structured_outputs
    else:
        raise ToolError(f"{path}: the SavedModel has no serving_default signature and no traced __call__")
    dims = list(shape)[1:] if shape.rank is not None else None
    if not dims or any(d is None for d in dims):
        if input_shape is None:
            raise ToolError(f"{path}: the SavedModel does not fix its input shape; name the data set")
        dims = list(input_shape)
    num_outputs = out_spec.shape[-1] if getattr(out_spec, "shape", None) is not None else None
    layer = SavedModelLogits(function, input_key, output_key, num_outputs, name="savedmodel")
    # Keep the loaded object alive as long as the model: the function refers to its variables.
    layer._loaded = loaded
    inputs = keras.Input(shape=tuple(dims), name="image")
    return keras.Model(inputs, layer(inputs), name=os.path.basename(os.path.normpath(path)))


def load_model_file(path: str, input_shape: Sequence[int] | None = None) -> keras.Model:
    """Load a model from a .keras/.h5 file, an original (Keras 2 HDF5) file or a SavedModel folder."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ToolError(f"{path}: a folder but not a TensorFlow SavedModel (no saved_model.pb)")
        return _load_savedmodel(path, input_shape)
    if not os.path.isfile(path):
        raise ToolError(f"{path}: model file not found")
    if path.endswith((MODEL_EXT, ".h5", ".hdf5")):
        return _load_keras_file(path)
    if _is_hdf5(path):
        return _load_legacy_hdf5(path)
    raise ToolError(f"{path}: not a model file (expected a .keras or .h5 file or a SavedModel folder)")


def _applies_softmax(layer) -> bool:
    """Whether a Keras layer's output is a softmax (Softmax layer, or activation='softmax')."""
    if isinstance(layer, layers.Softmax):
        return True
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "") == "softmax"


def _output_layer(model):
    """The layer that produces a single-output Keras model's output, or None."""
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1:
        history = getattr(outputs[0], "_keras_history", None)
        op = getattr(history, "operation", None) if history is not None else None
        if op is None and isinstance(history, tuple) and history:
            op = history[0]
        if op is not None:
            return op
    found = getattr(model, "layers", None)
    return found[-1] if found else None


def logits_model(model, path: str = "model") -> tuple:
    """The model scored on logits: a final softmax is removed.

    CLEVER is defined on logits (docs/format.md); gradients of probabilities
    are not what the bound needs. When the layer producing the output is a
    ``Softmax`` layer, an ``Activation("softmax")`` or a layer built with
    ``activation="softmax"`` (e.g. ``Dense(10, activation="softmax")``),
    returns a model with the same inputs and weights whose output is the
    tensor before the softmax: the softmax layer's input, or the same layer
    without its activation.

    Returns ``(model, notice)``: ``notice`` names the layer (None when the
    model was kept). Raises a one-line ToolError naming ``path`` when the
    softmax cannot be removed (e.g. a subclassed model).
    """
    last = _output_layer(model)
    if last is None or not _applies_softmax(last):
        return model, None
    how = ("a Softmax layer" if isinstance(last, layers.Softmax)
           else f"{type(last).__name__}(activation='softmax')")
    try:
        before = last.input
        if isinstance(last, (layers.Softmax, layers.Activation)):
            logits = before
        else:
            config = last.get_config()
            config.update(activation="linear", name=f"{last.name}_logits")
            twin = type(last).from_config(config)
            logits = twin(before)
            twin.set_weights(last.get_weights())
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        stripped = keras.Model(inputs, logits, name=f"{model.name}_logits")
    except Exception as err:  # noqa: BLE001 - any failure means we cannot rebuild the graph
        raise ToolError(f"{path}: the last layer {last.name!r} ({how}) outputs probabilities and "
                        f"the logits before it cannot be taken ({_error_line(err)}); save the model "
                        "without the final softmax (e.g. Dense(10) instead of "
                        "Dense(10, activation='softmax')) and pass that file") from None
    notice = (f"{path}: the last layer {last.name!r} is {how}; CLEVER is computed on the logits "
              "before it (the softmax is removed)")
    return stripped, notice


def check_logits(model: keras.Model, path: str, input_shape: Sequence[int] | None,
                 num_classes: int | None = NUM_CLASSES) -> None:
    """Check that ``model`` maps an image batch to logits [batch, num_classes].

    Raises a ToolError naming ``path`` otherwise, also when the outputs look
    like probabilities (non-negative, summing to 1), which CLEVER must not be
    run on (:func:`logits_model` removes a softmax layer it can find first).
    """
    if input_shape is None:
        shape = tuple(model.output_shape) if hasattr(model, "output_shape") else None
        if shape is not None and len(shape) != 2:
            raise ToolError(f"{path}: the model outputs shape {shape}, not logits [batch, classes]")
        return
    probe = np.random.default_rng(0).uniform(-0.5, 0.5, (2, *input_shape)).astype(np.float32)
    try:
        out = np.asarray(model(probe, training=False))
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"{path}: the model does not accept images of shape {tuple(input_shape)} "
                        f"({_error_line(err)})") from None
    if out.ndim != 2 or (num_classes is not None and out.shape[1] != num_classes):
        want = f"[batch, {num_classes}]" if num_classes else "[batch, classes]"
        raise ToolError(f"{path}: the model outputs shape {list(out.shape)} for 2 images, expected {want}")
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        raise ToolError(f"{path}: the outputs sum to 1 like probabilities; CLEVER needs logits: "
                        "save the model without its final softmax (e.g. Dense(10) instead of "
                        "Dense(10, activation='softmax')) and pass that file")


def load_model(dataset: str, model_name: str = "normal", activation: str = "relu",
               model_path: str | None = None, models_dir: str = "models") -> keras.Model:
    """Load a trained model that maps images [batch, H, W, C] to logits [batch, num_classes].

    Without ``model_path``: the model named ``model_name`` (normal, distilled,
    brelu, 2-layer, or the stem of a file under ``models_dir``) for
    ``dataset``, see :func:`models_path`. With ``model_path``: the user's own
    model, a .keras/.h5 file or a TensorFlow SavedModel folder (wrapped so
    that it is callable on a batch and differentiable).

    A model whose last layer applies softmax is scored on the logits before
    it (:func:`logits_model`, with a logged notice naming the layer).

    Raises a one-line ToolError for an unknown name, a missing file (saying
    how to train it), a file that does not load, or outputs that are not
    [batch, 10] logits for the data set's images.
    """
    input_shape = INPUT_SHAPES.get(dataset)
    path = model_path or model_file(dataset, model_name, activation, models_dir)
    model, notice = logits_model(load_model_file(path, input_shape), path)
    if notice:
        log.warning("%s", notice)
    check_logits(model, path, input_shape, NUM_CLASSES if input_shape else None)
    return model


def model_file(dataset: str, model_name: str, activation: str = "relu",
               models_dir: str = "models") -> str:
    """The existing file (or SavedModel folder) of a named model: :func:`models_path`,
    else the other names it may be stored under; a ToolError saying how to train
    it when there is none."""
    path = models_path(dataset, model_name, activation, models_dir)
    if not os.path.exists(path):
        path = _fallback_path(dataset, model_name, activation, models_dir) or path
    if not os.path.exists(path):
        raise ToolError(f"{path}: model file not found; train it with: "
                        f"{_train_hint(dataset, model_name, activation, models_dir)}")
    return path


def _fallback_path(dataset: str, model_name: str, activation: str, models_dir: str) -> str | None:
    """Other names the same model may be stored under (original extensionless files, train_nlayer names)."""
    if model_name not in MODEL_NAMES:
        return None
    stem = model_stem(dataset, model_name, activation)
    candidates = [stem + ".h5", stem]  # stem alone: a Keras 2 HDF5 file of the original tool
    if model_name == "normal" and activation == "relu":
        candidates.insert(0, nlayer_stem(dataset, "cnn", 7, "relu") + MODEL_EXT)
    for name in candidates:
        path = os.path.join(models_dir, name)
        if os.path.isfile(path):
            return path
    return None


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits [N, num_classes] float32 of ``images`` [N, H, W, C], in inference mode."""
    outs = [np.asarray(model(images[i:i + batch_size], training=False))
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose largest logit is the class of the one-hot ``labels``."""
    pred = predict_logits(model, images, batch_size).argmax(axis=1)
    return float(np.mean(pred == np.asarray(labels).argmax(axis=1)))
