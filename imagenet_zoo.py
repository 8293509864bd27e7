"""The ImageNet model zoo of CLEVER: Keras applications and the original's frozen graphs.

Models take float32 ``[N, S, S, 3]`` RGB images in [-0.5, 0.5] and output
logits, as stage 1 expects everywhere else in the toolkit.

* ``KERAS_MODELS``: a zoo built from ``keras.applications``. Each model carries
  its own preprocessing as its first layer (:class:`Preprocess`), so a
  sampling radius means the same thing for every network, and the classifier
  is built with ``classifier_activation=None`` (logits).
* ``FROZEN_MODELS``: the original tool's 18 frozen TF1 graphs (``.pb``), loaded
  with :func:`load_frozen_graph` into a differentiable Keras model. Several have
  1001 outputs where column 0 is a background class (``setup_imagenet.py``'s
  docstring, "Labels"); ``drop_background=True`` keeps ``logits[:, 1:]``.
* :func:`load_user_model`: a user's own Keras file, tagged alike.

Models returned here carry ``image_size``, ``num_classes`` (number of logits)
and ``background_class`` attributes. The images are ``imagenet_data.py``;
the command line is ``setup_imagenet.py``, which re-exports both.
"""
from __future__ import annotations

import enum
import functools
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

import common
from common import ToolError

log = logging.getLogger("clever.imagenet")

#: Where ``get_model`` looks for the original tool's frozen graphs by default.
DEFAULT_MODELS_DIR = os.path.join("models", "imagenet")

#: Name of the preprocessing layer at the front of every model built here.
PREPROCESS_LAYER = "imagenet_preprocess"

#: Name of the layer that runs an imported frozen graph.
FROZEN_LAYER = "frozen_graph"


#: Number of ImageNet (ILSVRC2012) classes, without a background class.
IMAGENET_CLASSES = 1000


# --------------------------------------------------------------------------
# Preprocessing: [-0.5, 0.5] RGB -> what each network was trained on
# --------------------------------------------------------------------------
class Preprocess(enum.Enum):
    """The input transform a network expects, applied inside the model.

    Each mode starts from toolkit images x in [-0.5, 0.5] (RGB). The Keras
    modes reproduce ``keras.applications.<app>.preprocess_input`` applied to
    the 0..255 image ``(x + 0.5) * 255`` with the same float32 operations in
    the same order; the ``slim*``/``alexnet`` modes reproduce what the original
    tool fed its frozen graphs.
    """

    CAFFE = "caffe"              # keras "caffe": RGB->BGR on 0..255, minus BGR mean
    TF = "tf"                    # keras "tf": 0..255 / 127.5 - 1 -> [-1, 1]
    TORCH = "torch"              # keras "torch": 0..255 / 255, minus mean, / std
    RAW255 = "raw255"            # 0..255 unchanged (EfficientNet normalizes inside)
    SLIM = "slim"                # original tool, TF-slim graphs: 2 x -> [-1, 1]
    SLIM_VGG = "slim_vgg"        # original tool, VGG graphs: 0..255 minus RGB mean
    CAFFE_ALEXNET = "alexnet"    # original tool, AlexNet graph: BGR 0..255 minus mean
    NONE = "none"                # identity: the graph takes [-0.5, 0.5] itself

    @property
    def description(self) -> str:
        """A short human-readable formula, for ``--list_models``."""
        return _PREPROCESS_TEXT[self]


_PREPROCESS_TEXT = {
    Preprocess.CAFFE: "caffe: BGR, 0..255 - mean",
    Preprocess.TF: "tf: [-1, 1]",
    Preprocess.TORCH: "torch: (0..1 - mean) / std",
    Preprocess.RAW255: "0..255 (normalized in model)",
    Preprocess.SLIM: "slim: 2x = [-1, 1]",
    Preprocess.SLIM_VGG: "slim vgg: RGB, 0..255 - mean",
    Preprocess.CAFFE_ALEXNET: "alexnet: BGR, 0..255 - mean",
    Preprocess.NONE: "none: [-0.5, 0.5]",
}

#: Per-channel constants, in the channel order each mode subtracts them.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
SLIM_VGG_MEAN_RGB = (123.68, 116.78, 103.94)
ALEXNET_MEAN_BGR = (104.0, 117.0, 124.0)


def preprocess(x, mode: Preprocess):
    """Map images in [-0.5, 0.5] to a network's input, with differentiable ops.

    ``x``: float32 tensor ``[..., 3]`` (RGB, channels last), eager or symbolic.
    Returns a tensor of the same shape. The operation order mirrors Keras'
    NumPy ``preprocess_input`` so results agree to the last float32 bit where
    the backend does not fuse operations.
    """
    from keras import ops

    mode = Preprocess(mode)
    if mode is Preprocess.NONE:
        return x
    if mode is Preprocess.SLIM:
        return x * 2.0
    x255 = (x + 0.5) * 255.0
    if mode is Preprocess.RAW255:
        return x255
    if mode is Preprocess.TF:
        return x255 / 127.5 - 1.0
    if mode is Preprocess.TORCH:
        mean = ops.convert_to_tensor(np.array(TORCH_MEAN_RGB, np.float32))
        std = ops.convert_to_tensor(np.array(TORCH_STD_RGB, np.float32))
        return (x255 / 255.0 - mean) / std
    if mode is Preprocess.SLIM_VGG:
        return x255 - ops.convert_to_tensor(np.array(SLIM_VGG_MEAN_RGB, np.float32))
    bgr_mean = {Preprocess.CAFFE: CAFFE_MEAN_BGR, Preprocess.CAFFE_ALEXNET: ALEXNET_MEAN_BGR}[mode]
    return ops.flip(x255, axis=-1) - ops.convert_to_tensor(np.array(bgr_mean, np.float32))


@functools.cache
def _layer_classes():
    """Define the Keras layers on first use, so importing this module stays cheap."""
    import keras

    @keras.saving.register_keras_serializable(package="clever_imagenet")
    class ImagePreprocess(keras.layers.Layer):
        """Applies :func:`preprocess` with a fixed :class:`Preprocess` mode."""

        def __init__(self, mode: str = "tf", **kwargs):
            super().__init__(**kwargs)
            self.mode = Preprocess(mode).value

        def call(self, x):
            return preprocess(x, Preprocess(self.mode))

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    class FrozenGraph(keras.layers.Layer):
        """Runs a pruned, imported GraphDef: ``[N, S, S, 3] -> [N, outputs]``.

        ``drop_first`` removes output column 0 (the background class).
        """

        def __init__(self, function, num_outputs: int, drop_first: bool = False, **kwargs):
            super().__init__(trainable=False, **kwargs)
            # A plain tuple keeps Keras from trying to track the function.
            self._function = (function,)
            self.num_outputs = int(num_outputs)
            self.drop_first = bool(drop_first)

        def call(self, x):
            import tensorflow as tf

            logits = self._function[0](tf.cast(x, tf.float32))
            logits = tf.reshape(logits, [-1, self.num_outputs])
            return logits[:, 1:] if self.drop_first else logits

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.num_outputs - int(self.drop_first))

    return ImagePreprocess, FrozenGraph


# --------------------------------------------------------------------------
# Model tables
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class KerasSpec:
    """A network of ``keras.applications`` with ImageNet weights.

    ``builder`` names the constructor in ``keras.applications``; ``options``
    are extra constructor arguments. ``weights_file`` is the file name Keras
    keeps in its cache (``~/.keras/models``); ``{size}`` stands for the input
    size where Keras picks weights by size (MobileNets). ``min_size`` is the
    smallest input Keras builds the network for (random weights only).
    """

    name: str
    builder: str
    input_size: int
    preprocess: Preprocess
    weights_file: str
    min_size: int = 32
    options: tuple = ()
    num_classes: int = IMAGENET_CLASSES
    background_class: bool = False

    @property
    def source(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"keras.applications.{self.builder}({opts})"

    def weights_filename(self, size: int | None = None) -> str:
        return self.weights_file.format(size=size or self.input_size)


@dataclass(frozen=True)
class FrozenSpec:
    """One of the original tool's frozen graphs (a TF1 GraphDef ``.pb``).

    ``input_name``/``logits_name`` are tensor names in the graph; ``num_classes``
    counts the logits (1001 with ``background_class``: column 0 is background).
    """

    name: str
    graph_file: str
    input_name: str
    logits_name: str
    input_size: int
    num_classes: int
    preprocess: Preprocess

    @property
    def background_class(self) -> bool:
        return self.num_classes == IMAGENET_CLASSES + 1

    @property
    def source(self) -> str:
        return f"frozen graph {self.graph_file} ({self.input_name} -> {self.logits_name})"


def _keras(name, builder, size, mode, weights_file, min_size=32, **options) -> KerasSpec:
    return KerasSpec(name, builder, size, mode, weights_file, min_size, tuple(sorted(options.items())))


_TFK = "_weights_tf_dim_ordering_tf_kernels.h5"

#: The Keras zoo. Input sizes, weight files and preprocessing are Keras 3's.
KERAS_MODELS: dict[str, KerasSpec] = {s.name: s for s in [
    _keras("resnet50", "ResNet50", 224, Preprocess.CAFFE, "resnet50" + _TFK),
    _keras("resnet101", "ResNet101", 224, Preprocess.CAFFE, "resnet101" + _TFK),
    _keras("resnet152", "ResNet152", 224, Preprocess.CAFFE, "resnet152" + _TFK),
    _keras("resnet50_v2", "ResNet50V2", 224, Preprocess.TF, "resnet50v2" + _TFK),
    _keras("resnet101_v2", "ResNet101V2", 224, Preprocess.TF, "resnet101v2" + _TFK),
    _keras("resnet152_v2", "ResNet152V2", 224, Preprocess.TF, "resnet152v2" + _TFK),
    _keras("inception_v3", "InceptionV3", 299, Preprocess.TF, "inception_v3" + _TFK, 75),
    _keras("inception_resnet_v2", "InceptionResNetV2", 299, Preprocess.TF,
           "inception_resnet_v2" + _TFK, 75),
    _keras("mobilenet_v1_0.25", "MobileNet", 224, Preprocess.TF, "mobilenet_2_5_{size}_tf.h5",
           alpha=0.25),
    _keras("mobilenet_v1_0.5", "MobileNet", 224, Preprocess.TF, "mobilenet_5_0_{size}_tf.h5",
           alpha=0.5),
    _keras("mobilenet_v1_1.0", "MobileNet", 224, Preprocess.TF, "mobilenet_1_0_{size}_tf.h5",
           alpha=1.0),
    _keras("mobilenet_v2", "MobileNetV2", 224, Preprocess.TF,
           "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}.h5"),
    _keras("vgg16", "VGG16", 224, Preprocess.CAFFE, "vgg16" + _TFK),
    _keras("vgg19", "VGG19", 224, Preprocess.CAFFE, "vgg19" + _TFK),
    _keras("densenet121", "DenseNet121", 224, Preprocess.TORCH, "densenet121" + _TFK),
    _keras("densenet169", "DenseNet169", 224, Preprocess.TORCH, "densenet169" + _TFK),
    _keras("densenet201", "DenseNet201", 224, Preprocess.TORCH, "densenet201" + _TFK),
    _keras("nasnet_large", "NASNetLarge", 331, Preprocess.TF, "nasnet_large.h5"),
    _keras("nasnet_mobile", "NASNetMobile", 224, Preprocess.TF, "nasnet_mobile.h5"),
    _keras("xception", "Xception", 299, Preprocess.TF, "xception" + _TFK, 71),
    _keras("efficientnet_b0", "EfficientNetB0", 224, Preprocess.RAW255, "efficientnetb0.h5"),
]}


def _frozen(name, graph_file, logits, size, classes, mode=Preprocess.SLIM, inp="input:0"):
    return FrozenSpec(name, graph_file, inp, logits, size, classes, mode)


#: The original tool's frozen graphs (frozen_imagenet_models_v1.1.tar.gz), under
#: its names, so that commands from its users' shell history keep working.
FROZEN_MODELS: dict[str, FrozenSpec] = {s.name: s for s in [
    _frozen("resnet_v2_50", "frozen_resnet_v2_50.pb", "resnet_v2_50/predictions/Reshape:0", 224, 1001),
    _frozen("resnet_v2_101", "frozen_resnet_v2_101.pb", "resnet_v2_101/predictions/Reshape:0", 224, 1001),
    _frozen("resnet_v2_152", "frozen_resnet_v2_152.pb", "resnet_v2_152/predictions/Reshape:0", 224, 1001),
    _frozen("inception_v1", "frozen_inception_v1.pb", "InceptionV1/Logits/Predictions/Reshape:0", 224, 1001),
    _frozen("inception_v2", "frozen_inception_v2.pb", "InceptionV2/Predictions/Reshape:0", 224, 1001),
    _frozen("inception_v3", "frozen_inception_v3.pb", "InceptionV3/Predictions/Reshape:0", 299, 1001),
    _frozen("inception_v4", "frozen_inception_v4.pb", "InceptionV4/Logits/Logits/BiasAdd:0", 299, 1001),
    _frozen("inception_resnet_v2", "frozen_inception_resnet_v2.pb",
            "InceptionResnetV2/Logits/Logits/BiasAdd:0", 299, 1001),
    _frozen("vgg_16", "frozen_vgg_16.pb", "vgg_16/fc8/squeezed:0", 224, 1000, Preprocess.SLIM_VGG),
    _frozen("vgg_19", "frozen_vgg_19.pb", "vgg_19/fc8/squeezed:0", 224, 1000, Preprocess.SLIM_VGG),
    _frozen("mobilenet_v1_025", "frozen_mobilenet_v1_025.pb", "MobilenetV1/Predictions/Reshape:0", 224, 1001),
    _frozen("mobilenet_v1_050", "frozen_mobilenet_v1_050.pb", "MobilenetV1/Predictions/Reshape:0", 224, 1001),
    _frozen("mobilenet_v1_100", "frozen_mobilenet_v1_100.pb", "MobilenetV1/Predictions/Reshape:0", 224, 1001),
    _frozen("alexnet", "alexnet_frozen.pb", "fc8/fc8:0", 227, 1000, Preprocess.CAFFE_ALEXNET,
            inp="Placeholder:0"),
    # The original fed 2x to its DenseNet graphs too; kept for identical scores.
    _frozen("densenet121_k32", "densenet121_k32_frozen.pb", "densenet121/predictions/Reshape:0", 224, 1000),
    _frozen("densenet169_k32", "densenet169_k32_frozen.pb", "densenet169/predictions/Reshape:0", 224, 1000),
    _frozen("densenet161_k48", "densenet161_k48_frozen.pb", "densenet161/predictions/Reshape:0", 224, 1000),
    _frozen("nasnet_large", "frozen_nasnet_large.pb", "final_layer/FC/BiasAdd:0", 331, 1001),
]}

#: The archive the original tool downloaded its graphs from (named in messages).
FROZEN_ARCHIVE = "frozen_imagenet_models_v1.1.tar.gz"


def list_models() -> list[KerasSpec | FrozenSpec]:
    """Every named model: the Keras zoo first, then the original's frozen graphs.

    Rows have ``name``, ``input_size``, ``num_classes``, ``preprocess`` and
    ``source``. Three names (inception_v3, inception_resnet_v2, nasnet_large)
    are in both tables; :func:`get_model` takes the Keras one unless given a
    ``.pb`` file or ``source="frozen"``.
    """
    return list(KERAS_MODELS.values()) + list(FROZEN_MODELS.values())


def model_spec(name: str, weights: str = "imagenet", source: str | None = None):
    """The table row :func:`get_model` uses for ``name`` and ``weights``."""
    if source not in (None, "keras", "frozen"):
        raise ToolError(f"source {source!r}: use 'keras' or 'frozen'")
    is_pb = isinstance(weights, str) and weights.lower().endswith(".pb")
    if source is None:
        source = "frozen" if (is_pb or name not in KERAS_MODELS) else "keras"
    table = FROZEN_MODELS if source == "frozen" else KERAS_MODELS
    if name not in table:
        if name in KERAS_MODELS or name in FROZEN_MODELS:
            raise ToolError(f"--model_name {name}: not a {source} model "
                            f"({'a .pb graph needs' if is_pb else 'use'} one of: {', '.join(table)})")
        raise ToolError(f"--model_name {name}: unknown ImageNet model; "
                        f"`setup_imagenet.py --list_models` lists: "
                        + ", ".join(dict.fromkeys([*KERAS_MODELS, *FROZEN_MODELS])))
    return table[name]


# --------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------
def keras_cache_dir() -> str:
    """The folder where Keras keeps downloaded weights (``<KERAS_HOME>/models``).

    Mirrors Keras 3: ``$KERAS_HOME`` or ``~/.keras`` (``/tmp/.keras`` where the
    home folder is not writable).
    """
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:  # pragma: no cover - private location moved
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):  # the same test as keras.utils.get_file
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")


def get_model(name: str, weights: str = "imagenet", input_size: int | None = None, *,
              models_dir: str = DEFAULT_MODELS_DIR, drop_background: bool = False,
              source: str | None = None):
    """Build a named ImageNet model taking [-0.5, 0.5] images and giving logits.

    ``name``: a key of ``KERAS_MODELS`` or ``FROZEN_MODELS`` (see
    :func:`list_models`). ``weights``:

    * ``"imagenet"``: Keras' cached weights (downloaded by Keras where a
      network is reachable); for a frozen graph, ``<models_dir>/<graph_file>``
      (or ``<models_dir>/imagenet/<graph_file>``);
    * ``"random"``: random initial weights (Keras zoo only; tests, benchmarks);
    * a path: a Keras weights file of that application (``.h5`` or
      ``.weights.h5``), or a frozen graph ``.pb`` for the original's names.

    ``input_size``: the square input side S; default the network's own. Random
    weights allow any S from the network's ``min_size``; ImageNet weights need
    the default (MobileNet v1: 128, 160, 192 or 224; v2: also 96).
    ``drop_background``: for 1001-output graphs, drop logit column 0.

    Returns a ``keras.Model`` mapping float32 ``[N, S, S, 3]`` to ``[N, C]``
    logits, with attributes ``image_size`` (S), ``num_classes`` (C) and
    ``background_class`` (whether column 0 is the background class).
    Raises :class:`ToolError` for unknown names, missing files or weights.
    """
    spec = model_spec(name, weights, source)
    if isinstance(spec, FrozenSpec):
        return _get_frozen_model(spec, weights, input_size, models_dir, drop_background)
    return _get_keras_model(spec, weights, input_size)


def _get_keras_model(spec: KerasSpec, weights: str, input_size: int | None):
    import keras

    size = spec.input_size if input_size is None else int(input_size)
    if size < spec.min_size:
        raise ToolError(f"--input_size {size}: {spec.name} needs at least {spec.min_size}")
    if weights == "random":
        keras_weights = None
    elif weights == "imagenet":
        keras_weights = "imagenet"
    else:
        if not os.path.isfile(weights):
            raise ToolError(f"--weights {weights}: no such file")
        keras_weights = weights
    builder = getattr(keras.applications, spec.builder)
    try:
        app = builder(include_top=True, weights=keras_weights, input_shape=(size, size, 3),
                      classes=spec.num_classes, classifier_activation=None, **dict(spec.options))
    except Exception as err:  # noqa: BLE001 - classified below, unexpected ones re-raised
        raise _weights_error(spec, weights, size, err) from err
    ImagePreprocess, _ = _layer_classes()
    inputs = keras.Input((size, size, 3), name="image")
    outputs = app(ImagePreprocess(spec.preprocess.value, name=PREPROCESS_LAYER)(inputs))
    model = keras.Model(inputs, outputs, name="clever_" + re.sub(r"\W", "_", spec.name))
    return _tag(model, size, spec.num_classes, False)


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _weights_error(spec: KerasSpec, weights: str, size: int, err: Exception) -> Exception:
    """Turn a failure of a Keras constructor into a one-line :class:`ToolError`."""
    text = _first_line(err)
    if weights == "imagenet" and "URL fetch failure" in str(err):
        folder = keras_cache_dir()
        fname = spec.weights_filename(size)
        path = os.path.join(folder, fname)
        state = ("is there but failed Keras' hash check; replace it"
                 if os.path.exists(path) else "is missing")
        return ToolError(f"{spec.name}: ImageNet weights {path} {state} and no network is "
                         f"reachable ({text}); place {fname} in {folder}/ or pass --weights PATH")
    if isinstance(err, (ValueError, OSError, KeyError)):
        what = {"imagenet": "ImageNet weights", "random": "random weights"}.get(
            weights, f"--weights {weights}")
        return ToolError(f"{spec.name}: cannot build at input size {size} with {what}: {text}")
    return err


def _tag(model, image_size: int, num_classes: int, background_class: bool):
    model.image_size = int(image_size)
    model.num_classes = int(num_classes)
    model.background_class = bool(background_class)
    return model


def _get_frozen_model(spec: FrozenSpec, weights: str, input_size: int | None,
                      models_dir: str, drop_background: bool):
    if input_size is not None and int(input_size) != spec.input_size:
        raise ToolError(f"--input_size {input_size}: the frozen graph of {spec.name} "
                        f"takes {spec.input_size} x {spec.input_size} images only")
    if weights == "random":
        raise ToolError(f"--weights random: {spec.name} is a frozen graph (its weights are in "
                        "the .pb file); random weights need a Keras zoo model")
    if weights == "imagenet":
        # The toolkit keeps graphs in models/imagenet; the original used one folder.
        candidates = [os.path.join(models_dir, spec.graph_file),
                      os.path.join(models_dir, "imagenet", spec.graph_file)]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise ToolError(f"{spec.name}: frozen graph {candidates[0]} not found; place the "
                            f"original tool's {spec.graph_file} (from {FROZEN_ARCHIVE}) in "
                            f"{models_dir}/ or pass --models_dir DIR or --weights PATH.pb")
    else:
        path = weights
    if drop_background and not spec.background_class:
        log.warning("%s has no background class; --drop_background ignored", spec.name)
    return load_frozen_graph(path, spec.input_name, spec.logits_name, spec.input_size,
                             spec.num_classes, spec.preprocess,
                             drop_background=drop_background and spec.background_class,
                             name=spec.name)


def _tensor_name(name: str) -> str:
    return name if ":" in name else name + ":0"


def load_frozen_graph(pb_path: str, input_name: str, logits_name: str, input_size: int,
                      num_outputs: int, preprocess_mode: Preprocess | str = Preprocess.SLIM, *,
                      drop_background: bool = False, name: str = "frozen"):
    """Wrap a frozen TF1 GraphDef as a differentiable Keras model.

    ``pb_path``: a binary GraphDef with its variables folded into constants.
    ``input_name``/``logits_name``: tensor names (``:0`` added if missing); the
    input is replaced by a ``[None, S, S, 3]`` float32 placeholder so any batch
    size works even where the graph fixed one. The graph is imported inside
    ``tf.compat.v1.wrap_function`` and pruned from that placeholder to the
    logits, which gives a TF2 function that ``tf.GradientTape`` differentiates.
    ``num_outputs``: logits per image (1001: column 0 is background);
    ``drop_background`` drops output column 0. ``preprocess_mode``: how [-0.5, 0.5] images are
    mapped to the graph's input (:class:`Preprocess`).

    Returns a ``keras.Model``: float32 ``[N, S, S, 3]`` in [-0.5, 0.5] ->
    ``[N, num_outputs (- 1)]`` logits, tagged like :func:`get_model`'s models.
    """
    import keras
    import tensorflow as tf

    if not os.path.isfile(pb_path):
        raise ToolError(f"{pb_path}: no such frozen graph file")
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(pb_path, "rb") as fh:
            graph_def.ParseFromString(fh.read())
    except Exception as err:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ToolError(f"{pb_path}: not a binary GraphDef ({_first_line(err)})") from err
    if not graph_def.node:
        raise ToolError(f"{pb_path}: not a binary GraphDef (no nodes)")
    input_name, logits_name = _tensor_name(input_name), _tensor_name(logits_name)
    nodes = {node.name for node in graph_def.node}
    for flag, tensor in (("input tensor", input_name), ("logits tensor", logits_name)):
        if tensor.split(":")[0] not in nodes:
            placeholders = [n.name for n in graph_def.node if n.op == "Placeholder"][:5]
            raise ToolError(f"{pb_path}: no {flag} {tensor} in the graph "
                            f"(its placeholders: {', '.join(placeholders) or 'none'})")
    size = int(input_size)

    def _import():
        image = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="clever_input")
        tf.compat.v1.import_graph_def(graph_def, input_map={input_name: image}, name="graph")

    try:
        wrapped = tf.compat.v1.wrap_function(_import, [])
        graph = wrapped.graph
        function = wrapped.prune(graph.get_tensor_by_name("clever_input:0"),
                                 graph.get_tensor_by_name("graph/" + logits_name))
    except (ValueError, KeyError, TypeError, tf.errors.OpError) as err:
        raise ToolError(f"{pb_path}: cannot import the graph from {input_name} to "
                        f"{logits_name}: {_first_line(err)}") from err
    ImagePreprocess, FrozenGraph = _layer_classes()
    drop = bool(drop_background)
    inputs = keras.Input((size, size, 3), name="image")
    x = ImagePreprocess(Preprocess(preprocess_mode).value, name=PREPROCESS_LAYER)(inputs)
    outputs = FrozenGraph(function, num_outputs, drop, name=FROZEN_LAYER)(x)
    model = keras.Model(inputs, outputs, name="clever_" + re.sub(r"\W", "_", name))
    background = int(num_outputs) == IMAGENET_CLASSES + 1 and not drop
    return _tag(model, size, int(num_outputs) - int(drop), background)


def load_user_model(path: str):
    """A user's own Keras model file (``.keras``/``.h5``), tagged like :func:`get_model`.

    It must take float32 ``[N, S, S, 3]`` images in [-0.5, 0.5] (its own
    preprocessing inside) and output logits; 1001 outputs mean column 0 is
    the background class.
    """
    import keras

    if not os.path.isfile(path):
        raise ToolError(f"--model_path {path}: no such file")
    _layer_classes()  # registers ImagePreprocess, for models saved from get_model
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the user's
        raise ToolError(f"--model_path {path}: cannot load a Keras model ({_first_line(err)})") from err
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] is None:
        raise ToolError(f"--model_path {path}: input shape {shape} is not [N, S, S, 3]")
    outputs = int(model.output_shape[-1])
    return _tag(model, shape[1], outputs, outputs == IMAGENET_CLASSES + 1)
