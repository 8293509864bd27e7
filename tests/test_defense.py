"""Input transformations of defense.py, against the original tool's arithmetic (docs/format.md)."""
import numpy as np
import pytest

import defense
from common import ToolError


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _total_variation(x):
    """Anisotropic total variation per image of [N, H, W, C]."""
    x = np.asarray(x, np.float64)
    return (np.abs(np.diff(x, axis=1)).sum(axis=(1, 2, 3))
            + np.abs(np.diff(x, axis=2)).sum(axis=(1, 2, 3)))


@pytest.mark.parametrize("name", sorted(defense.TRANSFORMS))
@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 32, 32, 3)])
def test_shape_dtype_and_range(name, shape):
    x = _images(shape)
    y = defense.get_transform(name)(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0


# --------------------------------------------------------------------------
# defend_reduce: (uint8(x * 255) >> 5) << 5, / 255
# --------------------------------------------------------------------------
def test_bit_reduction_known_levels():
    # x * 255 truncated, then the top 3 bits kept, worked by hand:
    # 0.1 -> 25.5 -> 25 -> 0; 0.2 -> 51 -> 32; 0.3 -> 76.5 -> 76 -> 64; 0.5 -> 127.5 -> 127 -> 96;
    # 0.75 -> 191.25 -> 191 -> 160; 0.8 -> 204 -> 192; 0.125 -> 31.875 -> 31 -> 0 (rounding would
    # give 32); 0.126 -> 32.13 -> 32 -> 32; 0.9999 -> 254.97 -> 254 -> 224; 1.0 -> 255 -> 224.
    x = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 0.8, 0.125, 0.126, 0.9999, 1.0], np.float32)
    expected = np.array([0, 0, 32, 64, 96, 160, 192, 0, 32, 224, 224]) / 255.0
    y = defense.defend_reduce(x.reshape(1, 1, -1, 1)).ravel()
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-7)


def test_bit_reduction_has_the_eight_levels_k_times_32_over_255():
    x = _images((2, 28, 28, 1))
    y = defense.defend_reduce(x)
    levels = np.unique(np.round(y.astype(np.float64) * 255, 4))
    np.testing.assert_array_equal(levels, [0, 32, 64, 96, 128, 160, 192, 224])
    # Truncation only lowers a value, by less than one level.
    assert np.all(y <= x + 1e-7) and np.all(x - y < 32 / 255 + 1e-6)


# --------------------------------------------------------------------------
# defend_png: np.around then uint8 (rounding); defend_jpeg: astype(uint8) (truncation)
# --------------------------------------------------------------------------
def test_png_rounds_to_8_bits():
    # 100.6 -> 101 and 50.4 -> 50 (rounding); truncation would give 100 and 50.
    x = np.array([100.6, 50.4, 0.0, 255.0, 254.7], np.float32) / np.float32(255)
    y = defense.defend_png(x.reshape(1, 1, -1, 1)).ravel()
    np.testing.assert_allclose(y, np.array([101, 50, 0, 255, 255]) / 255.0, rtol=0, atol=1e-7)


def test_png_is_lossless_beyond_the_rounding():
    x = _images((2, 16, 16, 3))
    y = defense.defend_png(x)
    np.testing.assert_allclose(y, np.around(x.astype(np.float64) * 255) / 255, rtol=0, atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_truncates_to_8_bits(channels):
    # A flat image survives JPEG at quality 75 exactly (its DC coefficient is a multiple of the
    # quantisation step), so the 8-bit conversion shows: 100.6/255 -> 100/255 (rounding: 101).
    x = np.full((2, 16, 16, channels), 100.6 / 255, np.float32)
    y = defense.defend_jpeg(x)
    np.testing.assert_allclose(y, 100 / 255, rtol=0, atol=1e-7)
    # Any image: JPEG sees floor(x * 255), so moving x inside its 8-bit bin changes nothing.
    z = _images((2, 16, 16, channels), seed=4)
    mid = ((np.floor(z.astype(np.float64) * 255) + 0.5) / 255).astype(np.float32)
    np.testing.assert_array_equal(defense.defend_jpeg(z), defense.defend_jpeg(mid))


def test_jpeg_changes_a_noisy_image_but_keeps_its_mean():
    x = _images((2, 32, 32, 3), seed=3)
    y = defense.defend_jpeg(x)
    assert np.abs(y - x).mean() > 0.02  # noise is what JPEG discards
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=0.02)


# --------------------------------------------------------------------------
# defend_tv: split Bregman on a random half of the pixels
# --------------------------------------------------------------------------
def _bregman_pixel_loop(image, mask, weight, eps=1e-3, max_iter=100):
    """The original's masked split Bregman written pixel by pixel: [H, W, C] -> [H, W, C].

    Raster-order Gauss-Seidel with lam = 2 weight; off the mask the data term
    is dropped (update = neighbour sum / 4); shrinkage by 1/lam from the
    forward differences before the pixel's update; a reflected border that is
    never updated; stop when the RMS change of a sweep is <= eps.
    """
    rows, cols, dims = image.shape
    u = np.zeros((rows + 2, cols + 2, dims))
    dx, dy, bx, by = (np.zeros_like(u) for _ in range(4))
    u[1:-1, 1:-1] = image
    u[0, 1:-1], u[-1, 1:-1] = image[1], image[-2]
    u[1:-1, 0], u[1:-1, -1] = image[:, 1], image[:, -2]
    lam = 2.0 * weight
    norm = weight + 4.0 * lam
    sweeps, rmse = 0, np.inf
    while sweeps < max_iter and rmse > eps:
        acc = 0.0
        for k in range(dims):
            for r in range(1, rows + 1):
                for c in range(1, cols + 1):
                    old = u[r, c, k]
                    gx, gy = u[r, c + 1, k] - old, u[r + 1, c, k] - old
                    s = (u[r + 1, c, k] + u[r - 1, c, k] + u[r, c + 1, k] + u[r, c - 1, k]
                         + dx[r, c - 1, k] - dx[r, c, k] + dy[r - 1, c, k] - dy[r, c, k]
                         - bx[r, c - 1, k] + bx[r, c, k] - by[r - 1, c, k] + by[r, c, k])
                    new = (lam * s + weight * image[r - 1, c - 1, k]) / norm if mask[r - 1, c - 1] \
                        else s / 4.0
                    u[r, c, k] = new
                    acc += (new - old) ** 2
                    for d, b, g in ((dx, bx, gx), (dy, by, gy)):
                        t = g + b[r, c, k]
                        d[r, c, k] = t - 1 / lam if t > 1 / lam else (t + 1 / lam if t < -1 / lam else 0)
                        b[r, c, k] += g - d[r, c, k]
        rmse = np.sqrt(acc / (rows * cols * dims))
        sweeps += 1
    return u[1:-1, 1:-1]


def test_tv_matches_the_pixel_by_pixel_split_bregman():
    x = _images((2, 7, 6, 3), seed=5)
    keep = np.random.default_rng(11).uniform(size=(2, 7, 6)) < 0.5  # the masks defend_tv draws
    expected = np.stack([np.clip(_bregman_pixel_loop(x[i].astype(np.float64), keep[i], 2 / 0.03),
                                 0, 1) for i in range(2)])
    got = defense.defend_tv(x, rng=np.random.default_rng(11))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.abs(got - x).max() > 0.1  # the transformation did something


def test_tv_lowers_total_variation_and_keeps_the_range():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:24, 0:24]
    clean = ((xx > 8) & (yy > 6)).astype(np.float64) * 0.6 + 0.2
    noisy = np.clip(clean + 0.15 * rng.standard_normal((3, 24, 24)), 0, 1)[..., None]
    y = defense.defend_tv(noisy.astype(np.float32), rng=0)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.all(_total_variation(y) < 0.7 * _total_variation(noisy))
    # ... and moves towards the clean image.
    assert np.abs(y[..., 0] - clean).mean() < np.abs(noisy[..., 0] - clean).mean()


def test_tv_leaves_a_flat_image_alone():
    x = np.full((2, 9, 9, 3), 0.3, np.float32)
    np.testing.assert_allclose(defense.defend_tv(x, rng=1), x, atol=1e-7)


def test_tv_is_reproducible_from_its_seed():
    x = _images((2, 12, 12, 1), seed=7)
    a = defense.defend_tv(x, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, defense.defend_tv(x, rng=np.random.default_rng(3)))
    np.testing.assert_array_equal(a, defense.defend_tv(x, rng=3))  # a seed works as well
    np.testing.assert_array_equal(defense.defend_tv(x), defense.defend_tv(x))  # default seed
    assert not np.allclose(a, defense.defend_tv(x, rng=np.random.default_rng(4)), atol=1e-3)


# --------------------------------------------------------------------------
# Names and the data range
# --------------------------------------------------------------------------
def test_none_is_the_identity():
    x = _images((1, 8, 8, 1))
    np.testing.assert_array_equal(defense.defend_none(x), x)


def test_apply_transform_works_in_the_data_range():
    x = _images((2, 28, 28, 1)) - 0.5
    y = defense.apply_transform("defend_reduce", x)
    assert y.min() >= -0.5 and y.max() <= 0.5
    np.testing.assert_allclose(y + 0.5, defense.defend_reduce(x + 0.5), atol=1e-6)
    t = defense.apply_transform("defend_tv", x[:, :10, :10], rng=np.random.default_rng(9))
    np.testing.assert_allclose(t + 0.5, defense.defend_tv(x[:, :10, :10] + 0.5, rng=9), atol=1e-6)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ToolError, match="defend_tv"):
        defense.get_transform("defend_blur")
    with pytest.raises(ToolError, match="expected images"):
        defense.defend_jpeg(np.zeros((4, 4)))
    with pytest.raises(ToolError, match="2x2"):
        defense.defend_tv(np.zeros((1, 1, 5, 1), np.float32))
