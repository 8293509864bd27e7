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
import logging
import os
import sys
import time
from typing import Sequence

import common
from common import ToolError

from training import *  # noqa: F401,F403 - the training library, re-exported
from training import (DEFAULTS, _progress_callback, fit, make_optimizer,  # noqa: F401
                      soft_labels, tempered_crossentropy, train_one)

log = logging.getLogger("clever.train")


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
