"""Train an n-layer MLP or CNN with a chosen activation (the original tool's train_nlayer.py).

    python train_nlayer.py --model mnist --modeltype cnn --activation tanh 32 32 64 64 200 200
    python train_nlayer.py --model digits --modeltype mlp --activation relu 1024 1024

Layer sizes are positional. MLP: one dense layer per number. CNN: the last
``--dense`` numbers (default 2) are dense layers, the others 3x3 valid
convolutions with a 2x2 max pooling after every second one, and dropout 0.5
after the first dense layer; so ``32 32 64 64 200 200`` is exactly the 7-layer
``normal`` CNN. The model has len(sizes) + 1 layers and is saved as
``<modelpath>/<model>_<modeltype>_<n>layer_<activation>.keras`` (or
``--modelfile``). As the original, ``--modelpath`` defaults to
``models_training``; with ``--models_dir models`` (or ``--modelpath models``)
the file is models/mnist_cnn_7layer_tanh.keras, the file ``--model_name
normal --activation tanh`` refers to elsewhere. Defaults as the original's:
``--modeltype mlp``, SGD (Nesterov momentum 0.9) with ``--lr`` 0.01 and
``--wd`` 1e-5, the learning-rate decay lr / (1 + wd * t) over batches t
(Adam: lr 0.001, wd 0), 50 epochs, batches of 256 (digits, this toolkit's
small set: Adam, fewer epochs, batches of 128). One line goes to stdout::

    [TRAIN] dataset = mnist, model = mnist_cnn_7layer_tanh, test_accuracy = 0.9921, time = 812.4s
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

import common
from common import ToolError
from training import DEFAULTS

log = logging.getLogger("clever.train")

MODEL_TYPES = ("mlp", "cnn")
#: The original's defaults: folder, batch size, learning-rate decay per optimizer.
ORIGINAL_MODELPATH = "models_training"
ORIGINAL_BATCH = 256
ORIGINAL_DECAY = {"sgd": 1e-5, "adam": 0.0}
ACTIVATION_NAMES = ("relu", "tanh", "sigmoid", "elu", "softplus", "hard_sigmoid", "arctan")
#: Which train_models default epochs a model type follows (digits trains MLPs longer).
_EPOCHS_LIKE = {"cnn": "normal", "mlp": "2-layer"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an n-layer MLP or CNN with a chosen activation.")
    parser.add_argument("layer_parameters", nargs="+", type=int, metavar="SIZE",
                        help="hidden units (MLP) or conv channels then dense units (CNN) per layer")
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="mnist", help="data set")
    parser.add_argument("--modeltype", choices=MODEL_TYPES, default="mlp")
    parser.add_argument("--activation", choices=ACTIVATION_NAMES, default="relu")
    parser.add_argument("--dense", type=int, default=2,
                        help="CNN only: how many of the last sizes are dense layers (default 2)")
    parser.add_argument("--lr", type=float, default=-1,
                        help="learning rate; -1: 0.01 sgd, 0.001 adam (0.003 adam on digits)")
    parser.add_argument("--wd", type=float, default=-1,
                        help="learning-rate decay of the original (Keras' decay): lr / (1 + wd * t) "
                             "after t batches; -1: 1e-5 sgd, 0 adam")
    parser.add_argument("--kernel_l2", type=float, default=0.0,
                        help="L2 penalty on the kernels (this toolkit's; default 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 50 for mnist and cifar; digits 12 (cnn) or 30 (mlp)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                        help="default: sgd for mnist/cifar (as the original), adam for digits")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default: 256 as the original (digits 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    parser.add_argument("--seed", type=int, default=1215)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--modelpath", default=None,
                        help="folder the model is saved to (the original's; default models_training)")
    parser.add_argument("--models_dir", default=None,
                        help="this toolkit's name for --modelpath (e.g. models, where stage 1 looks)")
    parser.add_argument("--modelfile", default="",
                        help="save to this file instead (.keras is added when missing)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    for size in args.layer_parameters:
        common.check_positive("layer size", size)
    if args.modeltype == "cnn" and not 0 <= args.dense <= len(args.layer_parameters):
        raise ToolError(f"--dense {args.dense}: must be between 0 and the {len(args.layer_parameters)} sizes given")
    defaults = DEFAULTS[args.model]
    common.check_positive("--epochs", args.epochs)
    if args.epochs is None:
        args.epochs = defaults.epochs_for(_EPOCHS_LIKE[args.modeltype])
    args.optimizer = args.optimizer or defaults.optimizer
    if args.lr == -1:  # the original's "not given"
        args.lr = defaults.lr if args.optimizer == defaults.optimizer else {"sgd": 0.01, "adam": 0.001}[args.optimizer]
    common.check_positive("--lr", args.lr)
    args.wd_given = args.wd != -1
    if not args.wd_given:
        args.wd = ORIGINAL_DECAY[args.optimizer]
    common.check_positive("--wd", args.wd, allow_zero=True)
    common.check_positive("--kernel_l2", args.kernel_l2, allow_zero=True)
    if args.batch_size is None:
        args.batch_size = 128 if args.model == "digits" else ORIGINAL_BATCH
    common.check_positive("--batch_size", args.batch_size)
    if args.modelpath and args.models_dir and os.path.normpath(args.modelpath) != os.path.normpath(args.models_dir):
        raise ToolError(f"--modelpath {args.modelpath} and --models_dir {args.models_dir} name two "
                        "folders; give one")
    args.models_dir = args.models_dir or args.modelpath or ORIGINAL_MODELPATH
    args.modelpath = args.models_dir
    return args


def model_file(args: argparse.Namespace) -> str:
    """``<models_dir>/<model>_<modeltype>_<n>layer_<activation>.keras`` with n = len(sizes) + 1,
    or ``--modelfile`` (with ``.keras`` added when missing)."""
    from models import MODEL_EXT, nlayer_stem

    if getattr(args, "modelfile", ""):
        return args.modelfile if args.modelfile.endswith(MODEL_EXT) else args.modelfile + MODEL_EXT
    stem = nlayer_stem(args.model, args.modeltype, len(args.layer_parameters) + 1, args.activation)
    return os.path.join(args.models_dir, stem + MODEL_EXT)


def build(args: argparse.Namespace, input_shape: Sequence[int]):
    """The untrained network the arguments describe (logits output)."""
    from models import build_cnn, build_mlp

    sizes = list(args.layer_parameters)
    name = os.path.splitext(os.path.basename(model_file(args)))[0]
    if args.modeltype == "mlp":
        return build_mlp(input_shape, sizes, activation=args.activation,
                         weight_decay=args.kernel_l2, name=name)
    split = len(sizes) - args.dense
    return build_cnn(input_shape, sizes[:split], sizes[split:], activation=args.activation,
                     weight_decay=args.kernel_l2, name=name)


def make_optimizer(args: argparse.Namespace, total_steps: int):
    """The original's optimizer: SGD (Nesterov momentum 0.9) or Adam with lr / (1 + wd * t).

    On digits with Adam and no ``--wd`` given, this toolkit's schedule
    (train_models.make_optimizer: cosine decay) keeps the short runs reliable.
    """
    import keras

    from training import make_optimizer as toolkit_optimizer

    if args.optimizer == "adam" and args.model == "digits" and not args.wd_given:
        return toolkit_optimizer("adam", args.lr, total_steps)
    lr = (keras.optimizers.schedules.InverseTimeDecay(args.lr, decay_steps=1, decay_rate=args.wd)
          if args.wd > 0 else args.lr)
    if args.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(learning_rate=lr)


def _fit(model, data, args: argparse.Namespace, desc: str):
    """Train ``model`` (logits) on softmax cross-entropy, as train_models.fit, with our optimizer."""
    import keras

    from training import _progress_callback, tempered_crossentropy

    steps = args.epochs * -(-len(data.train_data) // args.batch_size)
    model.compile(optimizer=make_optimizer(args, steps), loss=tempered_crossentropy(1.0),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    val = (data.validation_data, data.validation_labels) if len(data.validation_data) else None
    model.fit(data.train_data, data.train_labels, batch_size=args.batch_size, epochs=args.epochs,
              shuffle=True, verbose=0, validation_data=val,
              callbacks=[_progress_callback(desc, args.epochs)])
    return model


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    path = model_file(args)
    # Checked before any data is read or any time is spent training.
    if os.path.exists(path) and not args.overwrite:
        raise ToolError(f"{path}: model exists; pass --overwrite to train and replace it")
    import keras

    from models import accuracy, load_dataset, save_model

    data = load_dataset(args.model, args.data_dir)
    common.set_seed(args.seed)
    keras.utils.set_random_seed(args.seed)
    model = build(args, data.train_data.shape[1:])
    start = time.time()
    _fit(model, data, args, desc=os.path.basename(path))
    elapsed = time.time() - start
    test_acc = accuracy(model, data.test_data, data.test_labels)
    save_model(model, path)
    log.info("model saved to %s", path)
    common.write_json(os.path.splitext(path)[0] + ".json", common.provenance(
        vars(args), file=path, test_accuracy=test_acc, train_seconds=round(elapsed, 2)))
    stem = os.path.splitext(os.path.basename(path))[0]
    print(f"[TRAIN] dataset = {args.model}, model = {stem}, test_accuracy = {test_acc:.4f}, "
          f"time = {elapsed:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
