"""A lossless stand-in for the DC-AE autoencoder: space-to-depth of the image rescaled to [-1, 1].

It has the interface the training and sampling code uses from diffusers' `AutoencoderDC`:
`encode` gives raw latents (training multiplies them by `config.scaling_factor`), `decode`
takes raw latents (sampling divides by the scaling factor first). Pixel (y, x, c) lands in
latent cell (y // f, x // f), channel ((y % f)·f + x % f)·C + c, the order `PatchEmbed` uses.
Works on numpy and jax arrays alike (einops keeps the array type), so `decode` can be jitted.
"""

from __future__ import annotations

import dataclasses

import einops
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SpaceToDepthConfig:
    """factor: the spatial downsampling f; scaling_factor: what training multiplies raw latents by."""

    factor: int = 4
    scaling_factor: float = 1.0
    image_channels: int = 3

    def __post_init__(self):
        if self.factor < 1 or self.image_channels < 1:
            raise ValueError(f"invalid SpaceToDepthConfig: factor={self.factor} and "
                             f"image_channels={self.image_channels} must be >= 1")

    @property
    def latent_channels(self) -> int:
        return self.image_channels * self.factor**2


class SpaceToDepthAutoencoder:
    """images [B, H, W, C] in [0, 1] <-> raw latents [B, H/f, W/f, C·f²] in [-1, 1], exactly invertible."""

    def __init__(self, config: SpaceToDepthConfig):
        self.config = config

    def encode(self, images):
        """images: float [B, H, W, C] in [0, 1], H and W multiples of f -> raw latents [B, H/f, W/f, C·f²]."""
        cfg = self.config
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[3] != cfg.image_channels or shape[1] % cfg.factor or shape[2] % cfg.factor:
            raise ValueError(f"images of shape {shape} do not fit: expected [B, H, W, {cfg.image_channels}] with H "
                             f"and W multiples of factor={cfg.factor}")
        if not jnp.issubdtype(images.dtype, jnp.floating):  # also knows bfloat16
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
        f = cfg.factor
        return einops.rearrange(2 * images - 1, "b (h p) (w q) c -> b h w (p q c)", p=f, q=f)

    def decode(self, latents):
        """raw latents [B, h, w, C·f²] -> images [B, h·f, w·f, C] in [0, 1] (clipped: sampled latents overshoot)."""
        cfg = self.config
        shape = tuple(latents.shape)
        if len(shape) != 4 or shape[3] != cfg.latent_channels:
            raise ValueError(f"latents of shape {shape} do not fit: expected [B, h, w, {cfg.latent_channels}] "
                             f"(image_channels={cfg.image_channels} x factor²={cfg.factor**2})")
        f = cfg.factor
        images = einops.rearrange(latents, "b h w (p q c) -> b (h p) (w q) c", p=f, q=f)
        return ((images + 1) / 2).clip(0, 1)
