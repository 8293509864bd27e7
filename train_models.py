"""Train the original tool's models: normal, distilled, brelu and 2-layer.

    python train_models.py --dataset digits                 # all four, about 2 minutes on 2 cores
    python train_models.py --dataset mnist --models normal,distilled --epochs 50

Models are saved under ``--models_dir`` with the original tool's names
(``models.models_path``): e.g. models/digits.keras, models/digits-distilled-100.keras
(and its teacher models/digits-distilled-100_init.keras), models/digits_brelu.keras,
models/digits_2layer.keras. For each model one line goes to stdout::

    [TRAIN] dataset = digits, model = normal, test_accuracy = 0.9833, time = 12.3s

Training uses softmax cross-entropy on logits. ``distilled`` is defensive
distillation at temperature T = 100 (docs/format.md): a teacher is trained on
logits / T, its soft labels softmax(teacher logits / T) on the training images
become the targets of a student (started from the teacher's weights, as the
original did) trained on logits / T; the saved student outputs its plain
logits, i.e. it is evaluated at T = 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np

import common
from common import ToolError

log = logging.getLogger("clever.train")


@dataclasses.dataclass(frozen=True)
class TrainDefaults:
    """Per data set defaults: epochs (per model name, key "" for the rest), optimizer, learning rate."""

    epochs: Mapping[str, int]
    optimizer: str
    lr: float

    def epochs_for(self, model_name: str) -> int:
        return self.epochs.get(model_name, self.epochs[""])


#: MNIST and CIFAR: the original tool's 50 epochs of SGD (lr 0.01, momentum 0.9,
#: Nesterov, decay 1e-6). digits: Adam, sized so that the four demo models train
#: in about two minutes on two CPU cores and reliably reach the accuracy targets
#: (CNNs >= 95%, the 1024-unit MLP, which is cheap per epoch but slow to settle,
#: >= 90%).
DEFAULTS: dict[str, TrainDefaults] = {
    "mnist": TrainDefaults({"": 50}, "sgd", 0.01),
    "cifar": TrainDefaults({"": 50}, "sgd", 0.01),
    "digits": TrainDefaults({"": 12, "2-layer": 30}, "adam", 0.003),
}
#: Decay of the original SGD: lr_t = lr / (1 + 1e-6 t), t counting batches.
SGD_DECAY = 1e-6


def make_optimizer(name: str, lr: float, total_steps: int):
    """The optimizer ``name``.

    sgd: the original's Nesterov momentum 0.9 with lr / (1 + 1e-6 t);
    adam: Adam with a cosine decay of the learning rate to 0 over
    ``total_steps`` batches, so that the last epochs settle instead of
    ending on a noisy step (the short digits runs need that to be reliable).
    """
    import keras

    if name == "sgd":
        schedule = keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=SGD_DECAY)
        return keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, nesterov=True)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=max(1, total_steps)))
    raise ToolError(f"--optimizer: unknown optimizer {name!r}; use sgd or adam")


def tempered_crossentropy(temperature: float):
    """Loss: softmax cross-entropy of (logits / temperature) against (soft) one-hot targets."""
    import keras

    def loss(targets, logits):
        return keras.losses.categorical_crossentropy(targets, logits / temperature, from_logits=True)

    loss.__name__ = f"crossentropy_T{temperature:g}"
    return loss


def _progress_callback(desc: str, epochs: int):
    """A Keras callback showing a tqdm bar per epoch on stderr and logging validation accuracy."""
    import keras
    from tqdm import tqdm

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=None, leave=False)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}",
                                 val_acc=f"{logs.get('val_accuracy', float('nan')):.4f}")
            log.info("%s epoch %d/%d: loss = %.5g, val_accuracy = %.5g", desc, epoch + 1, epochs,
                     logs.get("loss", float("nan")), logs.get("val_accuracy", float("nan")))

        def on_train_end(self, logs=None):
            self.bar.close()

    return Progress()


def fit(model, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
        epochs: int, batch_size: int, optimizer: str, lr: float, temperature: float = 1.0,
        desc: str = "train"):
    """Train ``model`` (logits) in place on images [N, H, W, C] and (soft) one-hot targets [N, K].

    The loss is the cross-entropy of softmax(logits / temperature). Returns the model.
    """
    import keras

    steps = epochs * -(-len(train_x) // batch_size)
    model.compile(optimizer=make_optimizer(optimizer, lr, steps), loss=tempered_crossentropy(temperature),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    model.fit(train_x, train_y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              validation_data=(val_x, val_y) if len(val_x) else None,
              callbacks=[_progress_callback(desc, epochs)])
    return model


def soft_labels(model, images: np.ndarray, temperature: float, batch_size: int = 500) -> np.ndarray:
    """softmax(logits / temperature) of ``images``: float32 [N, K] soft targets for distillation."""
    from scipy.special import softmax

    from models import predict_logits

    logits = predict_logits(model, images, batch_size).astype(np.float64)
    return softmax(logits / temperature, axis=1).astype(np.float32)


def train_one(arch: str, data, epochs: int, batch_size: int, optimizer: str, lr: float,
              temperature: float = 100.0) -> dict[str, object]:
    """Train one architecture on ``data``; returns {file role: trained model}.

    Roles are "" for the model itself and "_init" for the teacher of a
    distilled model (saved beside it, as the original tool did).
    """
    from models import build_model

    shape = data.train_data.shape[1:]
    args = (data.train_data, data.train_labels, data.validation_data, data.validation_labels,
            epochs, batch_size, optimizer, lr)
    if arch != "distilled":
        return {"": fit(build_model(arch, shape), *args, desc=arch)}
    teacher = fit(build_model(arch, shape), *args, temperature=temperature, desc="distilled teacher")
    targets = soft_labels(teacher, data.train_data, temperature)
    val_targets = soft_labels(teacher, data.validation_data, temperature)
    student = build_model(arch, shape)
    student.set_weights(teacher.get_weights())
    fit(student, data.train_data, targets, data.validation_data, val_targets, epochs, batch_size,
        optimizer, lr, temperature=temperature, desc="distilled student")
    return {"": student, "_init": teacher}


def parse_models(text: str) -> list[str]:
    from models import MODEL_NAMES

    names = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in MODEL_NAMES:
            raise ToolError(f"--models: unknown model {name!r}; use any of {','.join(MODEL_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ToolError("--models is empty")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the normal, distilled, brelu and 2-layer models.")
    parser.add_argument("--dataset", choices=sorted(DEFAULTS), default="mnist")
    parser.add_argument("--models", default="normal,distilled,brelu,2-layer",
                        help="comma-separated list of normal, distilled, brelu, 2-layer (default all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per model (default: 50 for mnist and cifar; "
                             "digits 12, 30 for 2-layer)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                        help="default: sgd for mnist/cifar (as the original), adam for digits")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 0.01 sgd; 0.003 adam on digits, 0.001 elsewhere)")
    parser.add_argument("--temperature", type=float, default=100.0,
                        help="distillation temperature (default 100, as the -distilled-100 name says)")
    parser.add_argument("--seed", type=int, default=1215)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.dataset]
    args.model_list = parse_models(args.models)
    common.check_positive("--epochs", args.epochs)
    args.epochs_per_model = {m: defaults.epochs_for(m) if args.epochs is None else args.epochs
                             for m in args.model_list}
    args.optimizer = args.optimizer or defaults.optimizer
    if args.lr is None:
        args.lr = defaults.lr if args.optimizer == defaults.optimizer else {"sgd": 0.01, "adam": 0.001}[args.optimizer]
    common.check_positive("--batch_size", args.batch_size)
    common.check_positive("--lr", args.lr)
    common.check_positive("--temperature", args.temperature)
    return args


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    import keras

    from models import MODEL_EXT, MODEL_NAMES, accuracy, load_dataset, model_stem, save_model

    data = load_dataset(args.dataset, args.data_dir)
    for arch in args.model_list:
        # Seeded per model, so a model does not depend on which others were trained before it.
        model_seed = args.seed + MODEL_NAMES.index(arch)
        common.set_seed(model_seed)
        keras.utils.set_random_seed(model_seed)
        start = time.time()
        epochs = args.epochs_per_model[arch]
        trained = train_one(arch, data, epochs, args.batch_size, args.optimizer, args.lr,
                            args.temperature)
        elapsed = time.time() - start
        test_acc = accuracy(trained[""], data.test_data, data.test_labels)
        stem = model_stem(args.dataset, arch)
        for role, model in trained.items():
            path = os.path.join(args.models_dir, stem + role + MODEL_EXT)
            save_model(model, path)
            common.write_json(os.path.join(args.models_dir, stem + role + ".json"), common.provenance(
                vars(args), model=arch, role=role or "model", file=path, epochs=epochs,
                test_accuracy=accuracy(model, data.test_data, data.test_labels),
                train_seconds=round(elapsed, 2)))
            log.info("saved %s", path)
        print(f"[TRAIN] dataset = {args.dataset}, model = {arch}, test_accuracy = {test_acc:.4f}, "
              f"time = {elapsed:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))
