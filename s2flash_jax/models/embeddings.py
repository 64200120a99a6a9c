"""Time, guidance, caption and position embeddings of the SANA family."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2flash_jax.models.layers import dense
from s2flash_jax.precision import Precision

TIME_FREQ_DIM = 256


def timestep_sinusoid(t: jax.Array, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [cos | sin] of a (possibly fractional) time, in float32.

    Matches diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`.
    Kept in float32 because the sCM tangent differentiates through it.
    t: [B] -> [B, dim]
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepMLP(nnx.Module):
    """Linear -> SiLU -> Linear on sinusoidal features. [B, 256] -> [B, D]."""

    def __init__(self, dim: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear_1 = dense(TIME_FREQ_DIM, dim, ("time_freq", "mlp"), precision=precision, rngs=rngs)
        self.linear_2 = dense(dim, dim, ("mlp", "embed"), precision=precision, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(features)))


class CaptionProjection(nnx.Module):
    """Linear -> GELU(tanh) -> Linear from text-encoder width to D. [B, L, Cc] -> [B, L, D]."""

    def __init__(self, caption_channels: int, dim: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear_1 = dense(caption_channels, dim, ("caption", "mlp"), precision=precision, rngs=rngs)
        self.linear_2 = dense(dim, dim, ("mlp", "embed"), precision=precision, rngs=rngs)

    def __call__(self, caption: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(caption), approximate=True))


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding for a height x width token grid, as diffusers' PatchEmbed.

    Positions are rescaled so that a grid of `base_size` spans [0, base_size) (then divided by
    `interpolation_scale`); the first half of the channels encodes the column, the second the row.
    Computed in float64 on the host (shapes are static), returned as float32.
    Returns: [height * width, dim], tokens in row-major (row, column) order.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows = np.arange(height, dtype=np.float64) / (height / base_size) / interpolation_scale
    cols = np.arange(width, dtype=np.float64) / (width / base_size) / interpolation_scale
    col_grid, row_grid = np.meshgrid(cols, rows)  # each [height, width]

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(col_grid), embed_1d(row_grid)], axis=1).astype(np.float32)
