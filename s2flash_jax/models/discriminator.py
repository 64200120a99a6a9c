"""Discriminator heads on backbone token features: SANA-Sprint's LADD heads (StyleGAN-T's
projected-discriminator head, `DiscriminatorHeads`) and the S2-Flash / DMD2 conv heads
(`ConvDiscriminatorHeads`, described where they are defined, below the LADD heads).

Each LADD head reads the tokens of one hooked teacher block, [B, N, D], as a 1-D sequence of N
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

from s2flash_jax.precision import FP32, Precision

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


# ---- S2-Flash / DMD2 conv heads -------------------------------------------------------------
#
# DMD2's GAN head (tianweiy/DMD2 main/sd_guidance.py, `cls_pred_branch`), which the S2-Flash
# recipe puts on each tapped backbone block (shared/reference/recipes.md §4.2): the tokens
# [B, N, D] of one block go back onto their (H, W) grid, NHWC, and
#
#   [Conv 4x4 stride 2 pad 1 → GroupNorm → SiLU] × n   (D → D; halves the grid until a side ≤ 4)
#   Conv 4x4 stride 4 → GroupNorm → SiLU                 (4x4 -> 1x1)
#   Conv 1x1 (D → 1)                                     -> one logit per example
#
# A 32x32 grid (SANA at 1024 px, SDXL's 128² latents at the UNet bottleneck) takes n = 3, DMD2's
# SDXL head; 8x8 takes n = 1, its SD1.5 head. Every conv is D → D wide as in DMD2, so a head holds
# ≈ (n + 1)·16·D² parameters (≈ 85M at SANA-600M's D = 1152). Parameters and init are torch's
# (Conv2d: U(±1/√fan_in) weight and bias; GroupNorm: weight 1, bias 0, eps 1e-5).

HEAD_GRID = 4  # the spatial size the stride-2 blocks reduce to, which the 4x4 stride-4 conv consumes
MAX_GROUPS = 32  # DMD2's GroupNorm(32)
# After the 4x4 stride-4 conv the grid is 1x1, so GroupNorm's statistics there come from a group's
# channels alone: one channel per group normalises to a constant 0 (the head ignores its input),
# two to about ±1. DMD2's 1280 channels have 40 per group; narrow heads keep at least 8.
MIN_GROUP_CHANNELS = 8


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """GroupNorm groups for `channels`: the most groups, at most `max_groups` and with at least
    MIN_GROUP_CHANNELS channels each, that split the channels equally (torch's GroupNorm requires
    that); one group if no split has groups that wide. 32 from 256 channels up when 32 divides
    them (SANA's 1152 and 2240), 16 for 128, 8 for 64, 6 for 48, 1 below 16."""
    if channels < 1 or max_groups < 1:
        raise ValueError(f"channels={channels} and max_groups={max_groups} must be >= 1")
    most = max(1, min(max_groups, channels // MIN_GROUP_CHANNELS))
    return max(g for g in range(1, most + 1) if channels % g == 0)


def downsample_count(height: int, width: int) -> int:
    """Stride-2 blocks a head of an (height, width) token grid runs: each halves both sides (floor,
    as a 4x4 stride-2 pad-1 conv does) until a side is ≤ 4. 32x32 -> 3, 16x16 -> 2, 8x8 -> 1, 4x4
    and smaller -> 0. A non-square grid stops when its short side is ≤ 4 (64x32 -> 3, at 8x4)."""
    if height < 1 or width < 1:
        raise ValueError(f"token grid {height}x{width} must have positive sides")
    count = 0
    while min(height, width) > HEAD_GRID:
        height, width, count = height // 2, width // 2, count + 1
    return count


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, *,
          axes: tuple[str, str], precision: Precision, rngs: nnx.Rngs) -> nnx.Conv:
    """torch.nn.Conv2d(in, out, k, stride, padding) in NHWC with an HWIO kernel [k, k, in, out].

    axes: logical names of the kernel's input and output channel axes (the bias has the latter).
    x: [B, H, W, in] -> [B, H', W', out] in the compute dtype
    """
    init = _torch_conv_init(in_channels * kernel_size**2)
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=((padding, padding), (padding, padding)), dtype=precision.compute,
                    param_dtype=precision.param,
                    kernel_init=nnx.with_partitioning(init, ("conv_window", "conv_window", *axes)),
                    bias_init=nnx.with_partitioning(init, (axes[1],)), rngs=rngs)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm(groups, C, eps) over NHWC, statistics in float32.

    Per example and group of C/groups consecutive channels: mean and biased variance over
    (H, W, the group's channels), normalise, then a per-channel weight and bias.
    x: [B, H, W, C] -> [B, H, W, C] float32
    """

    def __init__(self, channels: int, groups: int, *, eps: float = 1e-5, precision: Precision):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} equal groups")
        self.groups = groups
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((channels,), precision.param), out_sharding=("mlp",))
        self.bias = nnx.Param(jnp.zeros((channels,), precision.param), out_sharding=("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, x.shape[-1] // self.groups)
        mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class ConvNormAct(nnx.Module):
    """Conv2d(D → D, k, stride, padding) → GroupNorm → SiLU, one stage of the conv head.

    x: [B, H, W, D] -> [B, H', W', D] float32
    """

    def __init__(self, channels: int, kernel_size: int, stride: int, padding: int, *, groups: int,
                 precision: Precision, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, kernel_size, stride, padding, axes=("embed", "mlp"),
                          precision=precision, rngs=rngs)
        self.norm = GroupNorm(channels, groups, precision=precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.norm(self.conv(x)))


class ConvHead(nnx.Module):
    """DMD2's GAN head on the tokens of one backbone block laid out on their (H, W) grid.

    The stride-2 blocks (`downsample_count`) leave h x w with a side ≤ 4. If both sides are 4 (any
    square grid of a power-of-two side ≥ 4), the 4x4 stride-4 conv makes it 1x1, DMD2 exactly.
    Otherwise:
    - a side of 4 or more (a non-square grid, e.g. 8x4): the 4x4 stride-4 conv runs on every whole
      4x4 window, dropping rows/columns past the last one as torch's conv does, and the logits of
      the windows are averaged;
    - a side under 4 (grids smaller than 4x4; 5 to 7 halved to 2 or 3): a global mean over the grid
      replaces the 4x4 stride-4 conv, followed by a 1x1 conv → GroupNorm → SiLU in its place.

    channels: the backbone width D. grid: the token grid (H, W); a head is built for one grid, as
    the number of stride-2 blocks depends on it. max_groups: GroupNorm's most groups (`group_count`).
    Convs compute in precision.compute (float32 by default, as DMD2 runs its head), GroupNorm
    statistics and the returned logits in float32.
    tokens: [B, N, D] with N = H·W in row-major (h, w) order, SANA's token order -> logits [B] float32
    """

    def __init__(self, channels: int, grid: tuple[int, int], *, max_groups: int = MAX_GROUPS,
                 precision: Precision = FP32, rngs: nnx.Rngs):
        height, width = grid
        count = downsample_count(height, width)
        self.grid = (height, width)
        self.channels = channels
        groups = group_count(channels, max_groups)
        side = min(height, width) // 2**count
        self.global_pool = side < HEAD_GRID
        # Parameters carry logical axis names only; parallel/ maps them to a mesh when it shards.
        with nnx.use_eager_sharding(False):
            self.downsample = nnx.List([
                ConvNormAct(channels, 4, 2, 1, groups=groups, precision=precision, rngs=rngs) for _ in range(count)])
            reduce_kernel = 1 if self.global_pool else HEAD_GRID
            self.reduce = ConvNormAct(channels, reduce_kernel, reduce_kernel, 0, groups=groups,
                                      precision=precision, rngs=rngs)
            self.cls = _conv(channels, 1, 1, 1, 0, axes=("embed", "scalar"), precision=precision, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        batch, count, channels = tokens.shape
        height, width = self.grid
        if count != height * width or channels != self.channels:
            raise ValueError(f"tokens {tokens.shape} do not fit this head: expected [B, {height * width}, "
                             f"{self.channels}] for a {height}x{width} grid of width {self.channels}")
        h = tokens.reshape(batch, height, width, channels)
        for block in self.downsample:
            h = block(h)
        if self.global_pool:
            h = jnp.mean(h.astype(jnp.float32), axis=(1, 2), keepdims=True)
        logits = self.cls(self.reduce(h)).astype(jnp.float32)  # [B, h', w', 1]
        return jnp.mean(logits, axis=(1, 2, 3))


class ConvDiscriminatorHeads(nnx.Module):
    """One ConvHead per tapped backbone block; their logits averaged (recipes.md §4.2: "sum or
    average"; the average keeps the logit scale, and so the loss weights, independent of how many
    blocks are tapped).

    features: num_heads arrays [B, N, width] (features[i] goes to head i), all on one token grid
    update_stats: accepted so a recipe can call these heads as it calls `DiscriminatorHeads`;
      nothing here has statistics to update.
    returns [B] float32
    """

    def __init__(self, width: int, num_heads: int, grid: tuple[int, int], *, max_groups: int = MAX_GROUPS,
                 precision: Precision = FP32, rngs: nnx.Rngs):
        if num_heads < 1:
            raise ValueError(f"num_heads={num_heads} must be >= 1")
        self.heads = nnx.List([ConvHead(width, grid, max_groups=max_groups, precision=precision, rngs=rngs)
                               for _ in range(num_heads)])

    def __call__(self, features: Sequence[jax.Array], *, update_stats: bool = False) -> jax.Array:
        del update_stats
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} heads")
        return jnp.mean(jnp.stack([head(f) for head, f in zip(self.heads, features)]), axis=0)
