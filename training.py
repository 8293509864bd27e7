"""Training the original tool's models (the library of ``train_models.py`` and
``train_nlayer.py``): per data set defaults, optimizers, the tempered loss of
defensive distillation, :func:`fit` and :func:`train_one`.

Softmax cross-entropy on logits; ``distilled`` is defensive distillation at
temperature T (``train_models.py``'s docstring). TensorFlow is imported when
a model is trained.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import numpy as np

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
