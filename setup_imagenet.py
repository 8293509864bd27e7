#!/usr/bin/env python3
"""ImageNet models and images for the CLEVER toolkit (docs/format.md).

Three things live here, all returning what stage 1 expects everywhere else in
the toolkit: Keras models that take float32 ``[N, S, S, 3]`` RGB images in
[-0.5, 0.5] and output logits, and images in that same range.

* ``KERAS_MODELS``: a zoo built from ``keras.applications``. Each model carries
  its own preprocessing as its first layer (:class:`Preprocess`), so a
  sampling radius means the same thing for every network, and the classifier
  is built with ``classifier_activation=None`` (logits). Every application
  listed can give logits that way.
* ``FROZEN_MODELS``: the original tool's 18 frozen TF1 graphs (``.pb``), loaded
  with :func:`load_frozen_graph` into a differentiable Keras model. Several have
  1001 outputs where column 0 is a background class; see "Labels" below.
* :class:`ImageNet`: a folder of images, named ``<label>.<anything>.jpg`` as in
  the original's validation subset or listed in a labels file, resized with
  the original's aspect-preserving crop.

Labels
------
The original's image names number the 1000 ImageNet classes from 1 (class 0 is
the background class of the TF-slim graphs). It fed the label unchanged to
1001-output graphs and subtracted 1 for the 1000-output ones (VGG, DenseNet,
AlexNet) by dropping column 0 of the one-hot labels. Here:

* :class:`ImageNet` reads file labels with ``label_base`` (1 for names, as the
  original; 0 for labels files, as the ILSVRC2012 ground truth used by Caffe
  and Keras) and returns one-hot labels with ``num_classes`` columns, or
  ``num_classes + 1`` with ``background_class=True`` (column 0 background), so
  a file label ``k`` lands in column ``k - label_base (+ 1)``.
* A 1001-output graph loaded with ``drop_background=False`` (default, as the
  original) keeps all 1001 logits: pair it with ``background_class=True`` and
  stage-1 file names carry the original's labels 1..1000. With
  ``drop_background=True`` its logits are ``logits[:, 1:]``, labelled 0..999
  like the Keras zoo.

Models returned by :func:`get_model` carry ``image_size``, ``num_classes``
(number of logits) and ``background_class`` attributes.

Usage::

    python setup_imagenet.py --list_models
    python setup_imagenet.py -m resnet50 --weights imagenet --data_dir imgs -n 10
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

import common
from common import ToolError
# The zoo and the images, re-exported: ``setup_imagenet`` is the name users know.
from imagenet_data import *  # noqa: F401,F403
from imagenet_data import IMAGE_EXTENSIONS, ImageNet, image_folder, load_for_stage1  # noqa: F401
from imagenet_zoo import *  # noqa: F401,F403
from imagenet_zoo import (DEFAULT_MODELS_DIR, FrozenSpec, KerasSpec, get_model,  # noqa: F401
                          list_models)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def format_table(rows: Sequence[KerasSpec | FrozenSpec]) -> str:
    """The ``--list_models`` table: name, kind, input size, classes, preprocessing, source."""
    header = ("name", "kind", "input", "classes", "preprocessing", "source")
    lines = [header] + [(r.name, "frozen" if isinstance(r, FrozenSpec) else "keras",
                         f"{r.input_size}x{r.input_size}",
                         f"{r.num_classes}" + (" (0 = background)" if r.background_class else ""),
                         r.preprocess.description, r.source) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ImageNet models and images for CLEVER: list the models, or build one "
                    "and classify a folder of images to check its weights and preprocessing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--list_models", action="store_true", help="print the model table and exit")
    parser.add_argument("-m", "--model_name", help="a name from --list_models")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (Keras cache, or the .pb in --models_dir), random, or a file")
    parser.add_argument("--models_dir", default=DEFAULT_MODELS_DIR,
                        help="folder of the original tool's frozen .pb graphs")
    parser.add_argument("--input_size", type=int, help="input side (random weights only)")
    parser.add_argument("--drop_background", action="store_true",
                        help="1001-output graphs: drop the background logit (labels 0..999)")
    parser.add_argument("--data_dir", help="folder of images <label>.<anything>.jpg to classify")
    parser.add_argument("--labels_file", help="lines '<file name> <label>' for --data_dir")
    parser.add_argument("--label_base", type=int, choices=[0, 1],
                        help="label of the first class in the files (default: 1 for names, "
                             "0 with --labels_file)")
    parser.add_argument("-n", "--numimg", type=int, help="number of images (default all)")
    parser.add_argument("-f", "--firstimg", type=int, default=0, help="first image")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    if not args.list_models and not args.model_name:
        raise ToolError("give --list_models or --model_name NAME")
    common.check_positive("--input_size", args.input_size)
    return args


def main(args: argparse.Namespace) -> int:
    common.setup_logging(args.verbose)
    if args.list_models:
        print(format_table(list_models()))
        return 0
    model = get_model(args.model_name, args.weights, args.input_size,
                      models_dir=args.models_dir, drop_background=args.drop_background)
    print(f"[IMAGENET] model = {args.model_name}, input = {model.image_size}x{model.image_size}x3, "
          f"classes = {model.num_classes}, background_class = {model.background_class}, "
          f"params = {model.count_params()}")
    if not args.data_dir:
        return 0
    data = ImageNet(args.data_dir, model.image_size, args.numimg, args.firstimg, args.labels_file,
                    background_class=model.background_class, label_base=args.label_base)
    correct = 0
    for start in range(0, len(data.files), 32):
        logits = np.asarray(model(data.test_data[start:start + 32], training=False))
        for row, pred in enumerate(np.argmax(logits, axis=1)):
            idx = start + row
            true = int(np.argmax(data.test_labels[idx]))
            correct += int(pred == true)
            print(f"[IMAGENET] id = {data.ids[idx]}, file = {data.files[idx]}, "
                  f"true_label = {true}, predicted = {int(pred)}, "
                  f"logit = {logits[row, pred]:.5g}")
    print(f"[IMAGENET] top1 = {correct / len(data.files):.5g} ({correct} of {len(data.files)})")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_cli(main, parse_args))

