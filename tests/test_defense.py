"""Input transformations of defense.py."""
import numpy as np
import pytest

import defense
from common import ToolError


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(defense.TRANSFORMS))
@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 32, 32, 3)])
def test_shape_dtype_and_range(name, shape):
    x = _images(shape)
    y = defense.get_transform(name)(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_bit_reduction_has_eight_levels_and_is_idempotent():
    x = _images((2, 28, 28, 1))
    y = defense.defend_reduce(x)
    np.testing.assert_allclose(np.unique(np.round(y * 7, 5)), np.arange(8))
    np.testing.assert_array_equal(defense.defend_reduce(y), y)
    assert np.abs(y - x).max() <= 0.5 / 7 + 1e-6


def test_png_is_lossless_on_8bit_images_and_idempotent():
    x = _images((2, 16, 16, 3))
    y = defense.defend_png(x)
    np.testing.assert_allclose(y, np.round(x * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(defense.defend_png(y), y)


def test_jpeg_changes_a_noisy_image_but_keeps_its_mean():
    x = _images((2, 32, 32, 3), seed=3)
    y = defense.defend_jpeg(x)
    assert np.abs(y - x).mean() > 0.02  # noise is what JPEG discards
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=0.02)


def test_none_is_the_identity():
    x = _images((1, 8, 8, 1))
    np.testing.assert_array_equal(defense.defend_none(x), x)


def test_apply_transform_keeps_the_data_range():
    x = _images((2, 28, 28, 1)) - 0.5
    y = defense.apply_transform("defend_reduce", x)
    assert y.min() >= -0.5 and y.max() <= 0.5
    np.testing.assert_allclose(y + 0.5, defense.defend_reduce(x + 0.5), atol=1e-6)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ToolError, match="defend_jpeg"):
        defense.get_transform("defend_blur")
    with pytest.raises(ToolError, match="expected images"):
        defense.defend_jpeg(np.zeros((4, 4)))
