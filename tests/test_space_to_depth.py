"""The space-to-depth stand-in autoencoder: exact inverse, analytic pixel placement, shape errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.models.space_to_depth import SpaceToDepthAutoencoder, SpaceToDepthConfig

AE = SpaceToDepthAutoencoder(SpaceToDepthConfig(factor=4))


def random_images(shape=(2, 8, 12, 3)) -> np.ndarray:
    """8-bit images as floats in [0, 1], as the demo's PNGs are."""
    return (np.random.default_rng(0).integers(0, 256, shape) / 255).astype(np.float32)


def test_latent_channels():
    assert SpaceToDepthConfig(factor=4).latent_channels == 48
    assert SpaceToDepthConfig(factor=2, image_channels=1).latent_channels == 4


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_round_trip_is_exact(as_array):
    images = random_images()
    latents = AE.encode(as_array(images))
    assert type(latents) is type(as_array(images))  # numpy stays numpy, jax stays jax
    assert latents.shape == (2, 2, 3, 48)
    assert float(latents.min()) == -1.0 and float(latents.max()) == 1.0  # [0, 1] -> [-1, 1]
    np.testing.assert_allclose(np.asarray(AE.decode(latents)), images, rtol=0, atol=1e-7)


def test_decode_jits_and_clips():
    latents = np.random.default_rng(1).normal(0, 2, (1, 2, 2, 48)).astype(np.float32)
    images = np.asarray(jax.jit(AE.decode)(latents))
    np.testing.assert_array_equal(images, AE.decode(latents))
    assert images.shape == (1, 8, 8, 3)
    assert images.min() == 0.0 and images.max() == 1.0
    inside = np.abs(latents) <= 1  # there decoding is the plain inverse
    np.testing.assert_allclose(AE.encode(images)[inside], latents[inside], atol=1e-6)


@pytest.mark.parametrize("y, x, c", [(0, 0, 0), (5, 6, 2), (7, 11, 1), (3, 8, 0)])
def test_one_bright_pixel_lands_in_its_cell_and_channel(y, x, c):
    f = 4
    images = np.zeros((1, 8, 12, 3), np.float32)
    images[0, y, x, c] = 1.0
    latents = AE.encode(images)
    expected = np.full((1, 2, 3, 48), -1.0, np.float32)
    expected[0, y // f, x // f, ((y % f) * f + x % f) * 3 + c] = 1.0
    np.testing.assert_array_equal(latents, expected)


def test_scaling_factor_is_carried_not_applied():
    """Like diffusers' AutoencoderDC: encode gives raw latents; the caller multiplies by scaling_factor."""
    scaled = SpaceToDepthAutoencoder(SpaceToDepthConfig(factor=4, scaling_factor=0.5))
    images = random_images()
    np.testing.assert_array_equal(scaled.encode(images), AE.encode(images))
    assert scaled.config.scaling_factor == 0.5


@pytest.mark.parametrize("shape, needle", [
    ((1, 10, 8, 3), "multiples of factor=4"),
    ((1, 8, 6, 3), "multiples of factor=4"),
    ((1, 8, 8, 4), "[B, H, W, 3]"),
    ((8, 8, 3), "[B, H, W, 3]"),
])
def test_encode_rejects_bad_shapes(shape, needle):
    with pytest.raises(ValueError, match=re.escape(str(shape))) as error:
        AE.encode(np.zeros(shape, np.float32))
    assert needle in str(error.value)


def test_encode_rejects_integer_images():
    with pytest.raises(ValueError, match="floats in \\[0, 1\\], got dtype uint8"):
        AE.encode(np.zeros((1, 4, 4, 3), np.uint8))


def test_decode_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[B, h, w, 48\]"):
        AE.decode(np.zeros((1, 2, 2, 12), np.float32))
