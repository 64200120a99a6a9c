"""SANA-Sprint's LADD discriminator heads (StyleGAN-T's projected-discriminator head).

Each head reads the tokens of one hooked teacher block, [B, N, D], as a 1-D sequence of N
positions with D channels (the torch code's [B, D, N] Conv1d input, transposed):

  entry    = SpectralConv1d(D→D, k=1) → BatchNormLocal(D) → LeakyReLU(0.2)
  residual = SpectralConv1d(D→D, k=9, circular padding 4) → BatchNormLocal(D) → LeakyReLU(0.2)
  h = entry(x);  h = (residual(h) + h) / √2;  logits = SpectralConv1d(D→1, k=1)(h)   -> [B, N]

as in StyleGAN-T networks/discriminator.py (DiscHead with c_dim=0) and its copy in diffusers'
examples/research_projects/sana/train_sana_sprint_diffusers.py. All of it runs in float32.

`update_stats=True` is torch's train mode: every spectral norm does one power iteration and
stores the new u, v (nnx.BatchStat, so `nnx.split(model, nnx.Param, ...)` keeps them apart from
the trainable parameters). `update_stats=False` is eval mode: u, v are read, not changed.
BatchNormLocal has no running statistics, so it behaves the same in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LEAKY_SLOPE = 0.2


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """torch.nn.functional.normalize: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _contract(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum at full float32 precision. The spectral-norm products are matrix-vector, negligible
    next to the conv, and σ scales every output; accelerators would otherwise run them in bf16."""
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


def _torch_conv_init(fan_in: int):
    """nn.Conv1d's default init for weight and bias alike: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class SpectralConv1d(nnx.Module):
    """Conv1d (stride 1, circular padding k//2) whose kernel is divided by its spectral norm,
    estimated as in torch.nn.utils.spectral_norm(n_power_iterations=1, dim=0, eps=1e-12).

    Torch views weight_orig [out, in, k] as the matrix W [out, in·k] and keeps u [out] and
    v [in·k]. Here the kernel is [k, in, out] and v is kept in the kernel's layout, [k, in], so
    W·v and Wᵀ·u are contractions over the kernel's axes with no reshape. A train-mode forward
    does v = normalize(Wᵀu), u = normalize(Wv), then σ = u·(Wv); an eval-mode forward only
    computes σ from the stored u, v. u and v carry no gradient; σ does (through W), as in torch.

    flax.nnx.SpectralNorm is not used because it cannot reproduce torch: it keeps only u (and σ),
    so eval mode still runs a power iteration instead of reusing a stored v; it normalises as
    x·rsqrt(‖x‖² + eps) instead of x / max(‖x‖, eps); and it writes the normalised kernel back
    into the wrapped layer's parameter, where torch keeps weight_orig unnormalised.

    axes: logical names (layers.py vocabulary) of the input and output channel axes.
    x: [B, N, in] -> [B, N, out] float32
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
                 axes: tuple[str | None, str | None], eps: float = 1e-12, rngs: nnx.Rngs):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the sequence length, got {kernel_size}")
        in_axis, out_axis = axes
        init = _torch_conv_init(in_features * kernel_size)
        self.eps = eps
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, in_features, out_features), jnp.float32),
                                out_sharding=("conv_window", in_axis, out_axis))
        self.bias = nnx.Param(init(rngs.params(), (out_features,), jnp.float32), out_sharding=(out_axis,))
        # Random unit vectors, as torch draws them when spectral_norm is applied.
        u = jax.random.normal(rngs.params(), (out_features,), jnp.float32)
        v = jax.random.normal(rngs.params(), (kernel_size, in_features), jnp.float32)
        self.u = nnx.BatchStat(_normalize(u, eps), out_sharding=(out_axis,))
        self.v = nnx.BatchStat(_normalize(v, eps), out_sharding=("conv_window", in_axis))

    def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
        kernel = self.kernel[...].astype(jnp.float32)
        u, v = self.u[...], self.v[...]
        if update_stats:
            frozen = jax.lax.stop_gradient(kernel)
            v = _normalize(_contract("kio,o->ki", frozen, u), self.eps)
            u = _normalize(_contract("kio,ki->o", frozen, v), self.eps)
            self.u[...], self.v[...] = u, v
        sigma = _contract("o,o->", u, _contract("kio,ki->o", kernel, v))

        pad = kernel.shape[0] // 2
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad, pad), (0, 0)), mode="wrap")
        y = jax.lax.conv_general_dilated(x, kernel / sigma, window_strides=(1,), padding="VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(jnp.float32)


class BatchNormLocal(nnx.Module):
    """Batch norm over small groups of consecutive samples ("virtual batches"), no running stats.

    As StyleGAN-T's BatchNormLocal, the batch is cut into G = ceil(B / virtual_batch) equal
    groups of g = B / G samples: g = virtual_batch when B is a multiple of it, otherwise fewer
    (B = 12 gives two groups of 6; B < virtual_batch gives one group of B), and a batch that G
    does not divide (B = 9) is rejected, as torch's view() rejects it. Each group is normalised
    per channel over (its samples, N) with the biased variance, then scaled and shifted.

    Data parallelism: the statistics come from a reshape to [G, g, N, D], so no group ever
    spans two batch shards when the per-device batch is a multiple of g (e.g. of
    virtual_batch); the normalisation then needs no cross-device communication and equals
    torch DDP's per-device BatchNormLocal. A per-device batch below virtual_batch would merge
    samples of neighbouring devices into one group where torch keeps them apart.

    x: [B, N, D] -> [B, N, D] float32
    """

    def __init__(self, num_features: int, *, virtual_batch: int = 8, eps: float = 1e-5):
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), out_sharding=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch = x.shape[0]
        groups = -(-batch // self.virtual_batch)
        if batch % groups:
            raise ValueError(f"batch {batch} does not split into {groups} equal groups "
                             f"(virtual_batch={self.virtual_batch})")
        grouped = x.astype(jnp.float32).reshape(groups, batch // groups, *x.shape[1:])
        mean = jnp.mean(grouped, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2), keepdims=True)
        y = ((grouped - mean) / jnp.sqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class ConvBlock(nnx.Module):
    """SpectralConv1d(D→D) → BatchNormLocal → LeakyReLU(0.2) (StyleGAN-T's make_block).

    x: [B, N, D] -> [B, N, D] float32
    """

    def __init__(self, channels: int, kernel_size: int, *, virtual_batch: int, rngs: nnx.Rngs):
        self.conv = SpectralConv1d(channels, channels, kernel_size, axes=("embed", None), rngs=rngs)
        self.norm = BatchNormLocal(channels, virtual_batch=virtual_batch)

    def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
        return jax.nn.leaky_relu(self.norm(self.conv(x, update_stats=update_stats)), LEAKY_SLOPE)


class DiscHead(nnx.Module):
    """One unconditional discriminator head (StyleGAN-T's DiscHead with c_dim=0).

    x: [B, N, D] (any float dtype) -> logits [B, N] float32
    """

    def __init__(self, channels: int, *, kernel_size: int = 9, virtual_batch: int = 8, rngs: nnx.Rngs):
        self.entry = ConvBlock(channels, 1, virtual_batch=virtual_batch, rngs=rngs)
        self.residual = ConvBlock(channels, kernel_size, virtual_batch=virtual_batch, rngs=rngs)
        self.cls = SpectralConv1d(channels, 1, 1, axes=("embed", "scalar"), rngs=rngs)

    def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
        h = self.entry(x.astype(jnp.float32), update_stats=update_stats)
        h = (self.residual(h, update_stats=update_stats) + h) / math.sqrt(2)
        return self.cls(h, update_stats=update_stats)[..., 0]


class DiscriminatorHeads(nnx.Module):
    """One DiscHead per hooked teacher block; their logits concatenated in head order, as
    SanaMSCMDiscriminator does.

    features: num_heads arrays [B, N, width] (features[i] goes to head i)
    returns [B, num_heads·N] float32
    """

    def __init__(self, width: int, num_heads: int, *, virtual_batch: int = 8, kernel_size: int = 9,
                 rngs: nnx.Rngs):
        # Parameters carry logical axis names only; parallel/ maps them to a mesh when it shards.
        with nnx.use_eager_sharding(False):
            self.heads = nnx.List([
                DiscHead(width, kernel_size=kernel_size, virtual_batch=virtual_batch, rngs=rngs)
                for _ in range(num_heads)])

    def __call__(self, features: Sequence[jax.Array], *, update_stats: bool) -> jax.Array:
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} heads")
        return jnp.concatenate(
            [head(f, update_stats=update_stats) for head, f in zip(self.heads, features)], axis=1)
