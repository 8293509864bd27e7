"""Input transformations ("defenses") scored with BPDA (GlobalSIP 2018).

Each defense maps a batch of images in [0, 1] (float32 [N, H, W, C], C = 1
or 3) to transformed images of the same shape in [0, 1], with the original
tool's arithmetic (docs/format.md):

* ``defend_reduce``: 8-bit value by truncation, keep its top 3 bits
  (levels k*32/255, the largest 224/255);
* ``defend_jpeg``: 8-bit value by truncation, JPEG at quality 75, decode;
* ``defend_png``: 8-bit value by rounding (``np.around``), PNG round trip;
* ``defend_tv``: total-variation minimisation (split Bregman) that keeps a
  random half of the pixels as data and fills in the rest.

Stage 1 samples around the UNtransformed x0 and evaluates the model at
T(clip(x0 + delta)), using the gradient at that point as the gradient at
x0 + delta (Backward Pass Differentiable Approximation: identity backward
pass). The transformations run in NumPy/Pillow, in the sampling workers.
``defend_tv`` is random: it takes a NumPy Generator (or a seed) for its mask,
so a run is reproducible.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from common import DEFAULT_DATA_RANGE, ToolError

#: Bits kept by bit-depth reduction, JPEG quality: the settings of the paper.
REDUCE_BITS = 3
JPEG_QUALITY = 75
#: defend_tv: fraction of pixels kept as data, TV strength (data weight 2/lambda_tv),
#: and the split Bregman stopping rule (RMS change per sweep, sweeps) of the original.
TV_KEEP_PROB = 0.5
TV_LAMBDA = 0.03
TV_EPS = 1e-3
TV_MAX_ITER = 100
#: The seed of defend_tv's mask when the caller gives none (reproducible by default).
TV_DEFAULT_SEED = 0


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ToolError(f"defense {what}: expected images [N, H, W, 1 or 3], got {images.shape}")
    return images


def _to_uint8_truncated(images: np.ndarray) -> np.ndarray:
    """``astype(uint8)`` of x*255, as the original (truncation, in float32).

    Clipping first changes nothing for images in [0, 1]; it only keeps
    rounding noise outside the range from wrapping around in the cast.
    """
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return (x * np.float32(255.0)).astype(np.uint8)


def defend_none(images: np.ndarray) -> np.ndarray:
    """Identity (a baseline that exercises the same code path)."""
    return np.array(images, dtype=np.float32, copy=True)


def defend_reduce(images: np.ndarray, bits: int = REDUCE_BITS) -> np.ndarray:
    """Bit-depth reduction as the original: ``(uint8(x*255) >> s) << s`` / 255, s = 8 - bits.

    images: float [N, H, W, C] in [0, 1] -> float32, same shape, on the levels
    k * 2**s / 255 (bits = 3: 0, 32/255, ..., 224/255; 1.0 maps to 224/255).
    """
    shift = 8 - int(bits)
    pixels = _to_uint8_truncated(images)
    return ((pixels >> shift) << shift).astype(np.float32) / np.float32(255.0)


def _pillow_roundtrip(pixels: np.ndarray, fmt: str, **save_kwargs) -> np.ndarray:
    """Encode and decode uint8 images [N, H, W, C] with Pillow: float32 in [0, 1]."""
    from PIL import Image

    out = np.empty(pixels.shape, dtype=np.float32)
    for i, img in enumerate(pixels):
        pil = Image.fromarray(img[..., 0], "L") if img.shape[-1] == 1 else Image.fromarray(img, "RGB")
        buf = io.BytesIO()
        pil.save(buf, format=fmt, **save_kwargs)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded, dtype=np.uint8).reshape(img.shape)
    return out / np.float32(255.0)


def defend_jpeg(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG at ``quality`` and back, as the original: 8-bit pixels by TRUNCATION of x*255.

    images: float [N, H, W, 1 or 3] in [0, 1] -> float32, same shape.
    """
    images = _check_images(images, "JPEG")
    return _pillow_roundtrip(_to_uint8_truncated(images), "JPEG", quality=int(quality))


def defend_png(images: np.ndarray) -> np.ndarray:
    """PNG round trip, as the original: 8-bit pixels by ROUNDING (``np.around``) of x*255.

    PNG is lossless, so the result is around(x*255)/255 (half to even).
    images: float [N, H, W, 1 or 3] in [0, 1] -> float32, same shape.
    """
    images = _check_images(images, "PNG")
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    pixels = np.around(x * np.float32(255.0)).astype(np.uint8)
    return _pillow_roundtrip(pixels, "PNG")


def _diagonals(h: int, w: int) -> list[slice]:
    """Slices of the flat padded grid [(h+2)*(w+2)] holding the pixels with r + c = s, per s.

    The original sweeps the pixels in raster order, each update reading the
    new values of the pixels above and to the left and the old values of the
    pixels below and to the right. The pixels of one anti-diagonal depend
    only on earlier anti-diagonals, so updating the anti-diagonals in order,
    each as one vector operation, performs exactly the original's sweep. On
    the flat grid an anti-diagonal is an arithmetic progression (step w + 1),
    so every neighbour is a strided view, no gather.
    """
    stride = w + 2
    out = []
    for s in range(2, h + w + 1):
        first, last = max(1, s - w), min(h, s - 1)
        out.append(slice(first * stride + s - first, last * stride + s - last + 1, w + 1))
    return out


def _shifted(sl: slice, offset: int) -> slice:
    return slice(sl.start + offset, sl.stop + offset, sl.step)


def tv_bregman_masked(images: np.ndarray, mask: np.ndarray, weight: float,
                      eps: float = TV_EPS, max_iter: int = TV_MAX_ITER) -> np.ndarray:
    """Anisotropic TV minimisation by split Bregman with data only on ``mask``, as the original.

    Approximately minimises sum |grad u|_1 + (weight/2) sum_{mask} (u - f)^2
    per image and channel: kept pixels are denoised, the others filled in.
    This is the original's ``bregman`` (scikit-image's split Bregman loop
    with the data term dropped off the mask): Gauss-Seidel sweeps in raster
    order with lam = 2 * weight, shrinkage by 1/lam right after each pixel's
    update from the forward differences before it, a border reflected from
    the input (row/column 1 mirrored, never updated), and per image the stop
    when the RMS change of a sweep is <= eps or after max_iter sweeps. The
    sweep is vectorised over images, channels and anti-diagonals (see
    :func:`_diagonals`), with the original's arithmetic in float64.

    images: float [N, H, W, C] (H, W >= 2); mask: bool [N, H, W] (or
    [N, H, W, C]), True = pixel kept as data. Returns float64 [N, H, W, C].
    """
    f = np.asarray(images, np.float64)
    n, h, w, c = f.shape
    if h < 2 or w < 2:
        raise ToolError(f"defense TV: images must be at least 2x2 pixels, got {h}x{w}")
    mask = np.asarray(mask, bool)
    if mask.ndim == 3:
        mask = mask[..., None]
    mask = np.broadcast_to(mask, f.shape)
    weight = float(weight)
    lam = 2.0 * weight
    norm = weight + 4.0 * lam
    thr = 1.0 / lam
    stride = w + 2
    size = (h + 2) * stride

    def grid(a):  # [N, h+2, w+2, C] -> [(h+2)*(w+2), N, C]: a diagonal is rows of one view
        return np.ascontiguousarray(np.moveaxis(a, 0, 2).reshape(size, n, c))

    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    # The border of u holds the reflected input for good; d and b stay zero there.
    u = grid(np.pad(f, pad, mode="reflect"))
    wf = weight * grid(np.pad(f, pad))  # the data term of the update
    mp = grid(np.pad(mask, pad))
    dx, dy, bx, by = (np.zeros_like(u) for _ in range(4))
    diagonals = [(d, _shifted(d, 1), _shifted(d, -1), _shifted(d, stride), _shifted(d, -stride))
                 for d in _diagonals(h, w)]
    total = h * w * c
    active = np.arange(n)
    for _ in range(int(max_iter)):
        if active.size == 0:
            break
        whole = active.size == n
        if whole:  # no copies while every image is still iterating
            U, DX, DY, BX, BY, WF, M = u, dx, dy, bx, by, wf, mp
        else:
            U, DX, DY, BX, BY, WF, M = (a[:, active] for a in (u, dx, dy, bx, by, wf, mp))
        sq = np.zeros(active.size)
        for i, right, left, down, up in diagonals:
            uprev = U[i].copy()
            ux = U[right] - uprev
            uy = U[down] - uprev
            # The sum in the original's order, so the arithmetic is the same.
            s = U[down] + U[up]
            s += U[right]
            s += U[left]
            s += DX[left]
            s -= DX[i]
            s += DY[up]
            s -= DY[i]
            s -= BX[left]
            s += BX[i]
            s -= BY[up]
            s += BY[i]
            # Off the mask: the original's weight -> 0 limit of the update.
            kept = lam * s
            kept += WF[i]
            kept /= norm
            s /= 4.0
            unew = np.where(M[i], kept, s)
            U[i] = unew
            unew -= uprev
            sq += np.square(unew).sum(axis=(0, 2))
            # d = shrink(grad u + b, 1/lam); s - clip(s, -t, t) is exactly the original's
            # three-way branch (s - t, s + t or 0).
            sx = ux + BX[i]
            sy = uy + BY[i]
            dxx = sx - np.clip(sx, -thr, thr)
            dyy = sy - np.clip(sy, -thr, thr)
            DX[i] = dxx
            DY[i] = dyy
            ux -= dxx
            uy -= dyy
            BX[i] += ux
            BY[i] += uy
        rmse = np.sqrt(sq / total)
        if not whole:
            for full, part in zip((u, dx, dy, bx, by), (U, DX, DY, BX, BY)):
                full[:, active] = part
        active = active[rmse > eps]
    out = u.reshape(h + 2, stride, n, c)[1:-1, 1:-1]
    return np.ascontiguousarray(np.moveaxis(out, 2, 0))


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(TV_DEFAULT_SEED if rng is None else rng)


def defend_tv(images: np.ndarray, rng: np.random.Generator | int | None = None,
              keep_prob: float = TV_KEEP_PROB, lambda_tv: float = TV_LAMBDA) -> np.ndarray:
    """Total-variation denoising on a random mask of the pixels, as the original.

    Per image, a pixel is kept as data where a uniform draw is < keep_prob
    (one mask over [H, W], shared by the channels); the image is then
    reconstructed by :func:`tv_bregman_masked` with weight 2 / lambda_tv.

    images: float [N, H, W, 1 or 3] in [0, 1]; rng: the Generator (or seed)
    that draws the masks, [N, H, W] uniforms in one call (None: seed
    TV_DEFAULT_SEED). Same generator state, same output. Returns float32,
    same shape, clipped to [0, 1] (TV keeps the range up to rounding).
    """
    images = _check_images(images, "TV")
    gen = _as_generator(rng)
    mask = gen.uniform(size=images.shape[:3]) < keep_prob
    out = tv_bregman_masked(images, mask, weight=2.0 / lambda_tv)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


#: The transformations by name (the original tool's ``--transform`` values).
TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "defend_none": defend_none,
    "defend_reduce": defend_reduce,
    "defend_jpeg": defend_jpeg,
    "defend_png": defend_png,
    "defend_tv": defend_tv,
}
#: Transformations that draw random numbers: they take an ``rng`` argument.
RANDOM_TRANSFORMS = frozenset({"defend_tv"})


def get_transform(name: str) -> Callable[..., np.ndarray]:
    """The transformation called ``name``; a clear error lists the valid names."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ToolError(f"--transform: unknown transformation {name!r}; valid: "
                        + ", ".join(TRANSFORMS)) from None


def apply_transform(name: str, points: np.ndarray,
                    rng: np.random.Generator | int | None = None,
                    data_range: tuple[float, float] | None = DEFAULT_DATA_RANGE) -> np.ndarray:
    """Apply ``name`` to points in ``data_range`` (lo, hi): float32 [N, H, W, C] -> same.

    Defenses are defined on [0, 1] images: the points are mapped affinely to
    [0, 1] ((x - lo) / (hi - lo)), transformed, mapped back and clipped to the
    data range. For the default [-0.5, 0.5] the maps are exact shifts. ``rng``
    (a Generator or a seed) feeds the random transformations (defend_tv) and
    is ignored by the others. ``data_range`` None (unbounded) is refused.
    """
    fn = get_transform(name)
    if data_range is None:
        raise ToolError(f"--transform {name}: needs a bounded --data_range, not none")
    lo, hi = np.float32(data_range[0]), np.float32(data_range[1])
    width = hi - lo
    unit = (np.asarray(points, np.float32) - lo) / width
    out = fn(unit, rng=rng) if name in RANDOM_TRANSFORMS else fn(unit)
    return (np.asarray(out, np.float32) * width + lo).astype(np.float32).clip(lo, hi)
