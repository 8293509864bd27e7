"""Input transformations ("defenses") scored with BPDA (GlobalSIP 2018).

Each defense maps a batch of images in [0, 1] (float, [N, H, W, C] with C 1
or 3) to transformed images of the same shape and range. Stage 1 evaluates
the model at T(x) and uses the gradient at T(x) as the gradient at x
(Backward Pass Differentiable Approximation: identity backward pass). The
transformations run in NumPy/Pillow, in the sampling worker processes.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from common import DATA_MAX, DATA_MIN, ToolError

#: Bits kept by bit-depth reduction, JPEG quality: the settings of the paper.
REDUCE_BITS = 3
JPEG_QUALITY = 75


def defend_none(images: np.ndarray) -> np.ndarray:
    """Identity (a baseline that exercises the same code path)."""
    return np.array(images, dtype=np.float32, copy=True)


def defend_reduce(images: np.ndarray, bits: int = REDUCE_BITS) -> np.ndarray:
    """Bit-depth reduction: round each value to one of 2**bits levels in [0, 1]."""
    levels = 2 ** bits - 1
    return (np.round(np.clip(images, 0.0, 1.0) * levels) / levels).astype(np.float32)


def _pillow_roundtrip(images: np.ndarray, fmt: str, **save_kwargs) -> np.ndarray:
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ToolError(f"defense {fmt}: expected images [N, H, W, 1 or 3], got {images.shape}")
    out = np.empty(images.shape, dtype=np.float32)
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    for i, img in enumerate(pixels):
        pil = Image.fromarray(img[..., 0], "L") if img.shape[-1] == 1 else Image.fromarray(img, "RGB")
        buf = io.BytesIO()
        pil.save(buf, format=fmt, **save_kwargs)
        buf.seek(0)
        decoded = np.asarray(Image.open(buf), dtype=np.float32) / 255.0
        out[i] = decoded.reshape(img.shape)
    return out


def defend_jpeg(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG compression at ``quality`` and decompression (8-bit pixels)."""
    return _pillow_roundtrip(images, "JPEG", quality=int(quality))


def defend_png(images: np.ndarray) -> np.ndarray:
    """PNG encoding and decoding: lossless beyond the 8-bit quantisation."""
    return _pillow_roundtrip(images, "PNG")


#: The transformations by name (the original tool's ``--transform`` values).
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "defend_none": defend_none,
    "defend_reduce": defend_reduce,
    "defend_jpeg": defend_jpeg,
    "defend_png": defend_png,
}


def get_transform(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The transformation called ``name``; a clear error lists the valid names."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ToolError(f"--transform: unknown transformation {name!r}; valid: "
                        + ", ".join(TRANSFORMS)) from None


def apply_transform(name: str, points: np.ndarray) -> np.ndarray:
    """Apply ``name`` to points in the data range [-0.5, 0.5]: [N, H, W, C] -> same.

    Defenses are defined on [0, 1] images; the shift keeps the toolkit's
    data range on both sides.
    """
    fn = get_transform(name)
    shifted = np.asarray(points, np.float32) - DATA_MIN
    return (fn(shifted) + DATA_MIN).astype(np.float32).clip(DATA_MIN, DATA_MAX)
