"""ImageNet images for the CLEVER toolkit, and the model and images of a stage-1 run.

:class:`ImageNet` reads a folder of images, named ``<label>.<anything>.jpg`` as
in the original's validation subset or listed in a labels file, resized with
the original's aspect-preserving crop, into float32 ``[N, S, S, 3]`` in
[-0.5, 0.5] with one-hot labels (``setup_imagenet.py``'s docstring, "Labels").
:func:`load_for_stage1` is what ``collect_gradients.py --dataset imagenet``
and the sweep load. The models are ``imagenet_zoo.py``.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

import common
import imagenet_zoo
from common import ToolError
from imagenet_zoo import DEFAULT_MODELS_DIR, IMAGENET_CLASSES, _first_line

log = logging.getLogger("clever.imagenet")

#: File extensions the image loader reads (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """The original tool's aspect-preserving resize and center crop.

    The shorter side is resized to ``size`` and the longer one to
    ``int(longer * size / shorter)`` (truncated, as the original; never below
    ``size``, where the original's float rounding could lose a pixel and drop
    the image). The crop is ``size`` pixels wide around ``new // 2`` in each
    direction: ``[c - size // 2, c - size // 2 + size)``.

    Returns ``(new_width, new_height, (left, top, right, bottom))`` in pixels,
    the box as ``PIL.Image.crop`` takes it.
    """
    if width < height:
        new_w, new_h = size, max(size, int(float(height) * (size / float(width))))
    else:
        new_w, new_h = max(size, int(float(width) * (size / float(height)))), size
    left, top = new_w // 2 - size // 2, new_h // 2 - size // 2
    return new_w, new_h, (left, top, left + size, top + size)


def load_image(path: str, size: int) -> np.ndarray:
    """One image as float32 ``[size, size, 3]`` RGB in [-0.5, 0.5].

    Resampling is Lanczos (PIL's former ANTIALIAS, as the original). Grey,
    palette, CMYK and RGBA images are converted to RGB (the original skipped
    images that were not 3-channel).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ToolError(f"{path}: cannot read image ({_first_line(err)})") from err
    new_w, new_h, box = crop_geometry(img.width, img.height, size)
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS).crop(box)
    return (np.asarray(img, dtype=np.float64) / 255.0 - 0.5).astype(np.float32)


def _is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def list_labelled_images(data_dir: str, labels_file: str | None = None) -> list[tuple[str, int]]:
    """``(file name, label as written)`` pairs of a folder, sorted by file name.

    Without ``labels_file`` every image file in ``data_dir`` is used and its
    label is the integer before the first dot of its name (``65.x.JPEG``).
    With one, each non-blank line not starting with ``#`` is
    ``<file name relative to data_dir> <label>``.
    """
    if not os.path.isdir(data_dir):
        raise ToolError(f"--data_dir {data_dir}: no such folder")
    pairs = []
    if labels_file is None:
        for fname in os.listdir(data_dir):
            if not _is_image(fname):
                continue
            head = fname.split(".", 1)[0]
            if not re.fullmatch(r"[0-9]+", head):
                raise ToolError(f"{os.path.join(data_dir, fname)}: name does not start with a "
                                "label (<label>.<anything>.jpg); use --labels_file for such folders")
            pairs.append((fname, int(head)))
    else:
        if not os.path.isfile(labels_file):
            raise ToolError(f"--labels_file {labels_file}: no such file")
        with open(labels_file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = text.rsplit(None, 1)
                if len(fields) != 2 or not re.fullmatch(r"[0-9]+", fields[1]):
                    raise ToolError(f"{labels_file}:{lineno}: expected '<file name> <label>', "
                                    f"got {text!r}")
                if not os.path.isfile(os.path.join(data_dir, fields[0])):
                    raise ToolError(f"{labels_file}:{lineno}: {os.path.join(data_dir, fields[0])} "
                                    "does not exist")
                pairs.append((fields[0], int(fields[1])))
    if not pairs:
        raise ToolError(f"--data_dir {data_dir}: no images"
                        + (f" listed in {labels_file}" if labels_file else
                           f" ({', '.join(IMAGE_EXTENSIONS)})"))
    return sorted(pairs)


class ImageNet:
    """ImageNet test images from a folder, in sorted file-name order.

    ``data_dir``: the folder; ``image_size``: the model's input side S.
    ``num_images``/``first``: load images ``first .. first + num_images - 1`` of
    the sorted list (all from ``first`` when ``num_images`` is None); the
    original shuffled its list and kept 500, which no seed reproduces, so a
    sorted order stands in for a reproducible one. ``labels_file``: lines
    ``<file name> <label>`` (else labels come from the names).
    ``label_base``: the label the files give the first ImageNet class; default
    1 for names (the original's subset) and 0 with a labels file (ILSVRC2012
    ground truth). ``num_classes``: classes without background;
    ``background_class``: one-hot labels get an extra column 0 (1001-output
    graphs) and class k goes to column k + 1.

    Attributes: ``test_data`` float32 ``[N, S, S, 3]`` in [-0.5, 0.5];
    ``test_labels`` float32 one-hot ``[N, num_classes (+1)]``; ``files``
    (names, relative to ``data_dir``); ``ids`` (positions in the sorted list,
    the image ids of stage-1 file names).
    """

    def __init__(self, data_dir: str, image_size: int, num_images: int | None = None,
                 first: int = 0, labels_file: str | None = None,
                 num_classes: int = IMAGENET_CLASSES, background_class: bool = False,
                 label_base: int | None = None):
        common.check_positive("--image_size", image_size)
        common.check_positive("--numimg", num_images)
        common.check_positive("--firstimg", first, allow_zero=True)
        pairs = list_labelled_images(data_dir, labels_file)
        if first >= len(pairs):
            raise ToolError(f"--firstimg {first}: {data_dir} has only {len(pairs)} images")
        stop = len(pairs) if num_images is None else min(len(pairs), first + num_images)
        if label_base is None:
            label_base = 0 if labels_file else 1
        offset = int(bool(background_class))
        self.files = [fname for fname, _ in pairs[first:stop]]
        self.ids = np.arange(first, stop)
        self.test_data = np.empty((stop - first, image_size, image_size, 3), np.float32)
        self.test_labels = np.zeros((stop - first, num_classes + offset), np.float32)
        for row, (fname, label) in enumerate(pairs[first:stop]):
            cls = label - label_base
            if not 0 <= cls < num_classes:
                raise ToolError(f"{os.path.join(data_dir, fname)}: label {label} is outside "
                                f"{label_base}..{label_base + num_classes - 1}")
            self.test_data[row] = load_image(os.path.join(data_dir, fname), image_size)
            self.test_labels[row, cls + offset] = 1.0
        log.info("loaded %d of %d images from %s at %d x %d", stop - first, len(pairs),
                 data_dir, image_size, image_size)


# --------------------------------------------------------------------------
# Stage 1 entry point
# --------------------------------------------------------------------------
def image_folder(data_dir: str) -> str:
    """``<data_dir>/imagenet`` where that folder exists, else ``data_dir`` itself."""
    nested = os.path.join(data_dir, "imagenet")
    return nested if os.path.isdir(nested) else data_dir


def stage1_model(*, model_name: str, weights: str = "imagenet", model_path: str | None = None,
                 input_size: int | None = None, models_dir: str | None = None,
                 drop_background: bool = False):
    """The model of ``collect_gradients.py --dataset imagenet`` (its flags by name).

    ``model_path`` ending in ``.pb`` is the frozen graph of the named original
    model; another ``model_path`` is a user's Keras model file
    (:func:`imagenet_zoo.load_user_model`); else the zoo's ``model_name`` with
    ``weights``. ``drop_background`` (no stage-1 flag; ``setup_imagenet.py``'s):
    a 1001-output graph keeps logits 1..1000 only.
    """
    if model_path and not model_path.lower().endswith(".pb"):
        return imagenet_zoo.load_user_model(model_path)
    return imagenet_zoo.get_model(model_name, model_path or weights, input_size,
                                  models_dir=models_dir or DEFAULT_MODELS_DIR,
                                  drop_background=drop_background)


def stage1_images(image_size: int, *, data_dir: str, numimg: int, firstimg: int = 0,
                  ids: str = "", labels_file: str | None = None,
                  label_base: int | None = None) -> ImageNet:
    """The images of a stage-1 run at ``image_size``: :func:`image_folder` of ``data_dir``
    in sorted order, from the first one (image ids are positions in that order) up to
    ``firstimg + numimg`` (all of them with an ``ids`` file). Labels one-hot over the
    1000 classes."""
    numimg_loaded = None if ids else firstimg + numimg
    return ImageNet(image_folder(data_dir), image_size, numimg_loaded, 0, labels_file,
                    IMAGENET_CLASSES, False, label_base)


def load_for_stage1(*, model_name: str, weights: str = "imagenet", model_path: str | None = None,
                    input_size: int | None = None, models_dir: str | None = None,
                    data_dir: str = "data", numimg: int = 1, firstimg: int = 0, ids: str = "",
                    labels_file: str | None = None, label_base: int | None = None,
                    drop_background: bool = False) -> tuple:
    """Model and images for ``collect_gradients.py --dataset imagenet``:
    :func:`stage1_model` and :func:`stage1_images` at the model's size.

    Returns ``(model, data, label_offset)`` with ``data`` an :class:`ImageNet`;
    ``label_offset`` (1 for a model whose logit 0 is the background class, else
    0) turns a label into the model's class index.
    """
    model = stage1_model(model_name=model_name, weights=weights, model_path=model_path,
                         input_size=input_size, models_dir=models_dir,
                         drop_background=drop_background)
    data = stage1_images(model.image_size, data_dir=data_dir, numimg=numimg, firstimg=firstimg,
                         ids=ids, labels_file=labels_file, label_base=label_base)
    return model, data, int(model.background_class)


def settings_for_stage1(settings) -> dict:
    """The keywords of :func:`load_for_stage1` in a ``settings.Stage1Settings``."""
    return {k: getattr(settings, k) for k in (
        "model_name", "weights", "model_path", "input_size", "models_dir", "data_dir",
        "numimg", "firstimg", "ids", "labels_file")}
