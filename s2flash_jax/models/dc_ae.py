"""The DC-AE autoencoder SANA uses (diffusers' `AutoencoderDC`), in Flax NNX, NHWC.

Numerically diffusers' `AutoencoderDC` encoder and decoder; `DCAEConfig` carries its `config.json`
keys one to one. Module and attribute names follow diffusers' so that a parameter's path is its
state-dict key ('encoder/down_blocks/3/0/attn/to_q/kernel' <- 'encoder.down_blocks.3.0.attn.to_q.weight').
`DCAutoencoder` has the interface (and value ranges) of `SpaceToDepthAutoencoder`, so code written for
one (training's `encode`, sampling's `decode`) takes the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.layers import RMSNorm, dense
from s2flash_jax.models.sana import GLUMBConv
from s2flash_jax.precision import Precision

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm",)
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the erf form
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
# diffusers takes any value but "pixel_unshuffle" for a strided conv; SANA's config says "Conv".
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv", "Conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
NORM_EPS = 1e-5
LINEAR_ATTENTION_EPS = 1e-15
FFN_EXPANSION = 4  # diffusers' GLUMBConv default, which EfficientViTBlock keeps


def _per_stage(value, stages: int, key: str, problems: list[str]) -> tuple:
    """diffusers lets one value stand for every stage; lists (from JSON) become tuples."""
    values = (value,) * stages if isinstance(value, str) else tuple(
        tuple(v) if isinstance(v, list | tuple) else v for v in value)
    if len(values) != stages:
        problems.append(f"{key} has {len(values)} entries for {stages} stages")
    return values


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Architecture of a DC-AE: diffusers' `AutoencoderDC` keys, names and defaults.

    Per-stage keys accept one string for all stages, as diffusers does; after construction they are
    tuples. `SANA_F32C32` below is the configuration SANA and SANA-Sprint ship with.
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] | str = "ResBlock"
    decoder_block_types: tuple[str, ...] | str = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple[str, ...] | str = "rms_norm"
    decoder_act_fns: tuple[str, ...] | str = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self):
        problems: list[str] = []
        for side in ("encoder", "decoder"):
            stages = len(getattr(self, f"{side}_block_out_channels"))
            if stages < 2:
                problems.append(f"{side}_block_out_channels needs at least 2 stages, got {stages}")
            keys = [f"{side}_{k}" for k in ("block_types", "block_out_channels", "layers_per_block", "qkv_multiscales")]
            keys += ["decoder_norm_types", "decoder_act_fns"] if side == "decoder" else []
            for key in keys:
                object.__setattr__(self, key, _per_stage(getattr(self, key), stages, key, problems))
        self._check_values(problems)
        if not problems:
            self._check_widths(problems)
        if problems:
            raise ValueError("invalid DCAEConfig: " + "; ".join(problems))

    def _check_values(self, problems: list[str]) -> None:
        def check(key: str, values, allowed) -> None:
            bad = sorted({str(v) for v in values if v not in allowed})
            if bad:
                problems.append(f"{key}={', '.join(bad)} is not supported; expected one of {list(allowed)}")

        check("encoder_block_types", self.encoder_block_types, BLOCK_TYPES)
        check("decoder_block_types", self.decoder_block_types, BLOCK_TYPES)
        check("decoder_norm_types", self.decoder_norm_types, NORM_TYPES)
        check("decoder_act_fns", [a.lower() for a in self.decoder_act_fns], ACTIVATIONS)
        check("decoder_conv_act_fn", [self.decoder_conv_act_fn.lower()], ACTIVATIONS)
        check("downsample_block_type", [self.downsample_block_type], DOWNSAMPLE_TYPES)
        check("upsample_block_type", [self.upsample_block_type], UPSAMPLE_TYPES)
        for key in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            if any(k < 1 or k % 2 == 0 for scales in getattr(self, key) for k in scales):
                problems.append(f"{key}={[list(s) for s in getattr(self, key)]}: kernel sizes must be odd")
        for key in ("in_channels", "latent_channels", "attention_head_dim"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be >= 1")

    def _check_widths(self, problems: list[str]) -> None:
        """Shapes diffusers would only fail on (or silently misshape) in the forward pass."""
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_block_out_channels")
            layers = getattr(self, f"{side}_layers_per_block")
            if layers[0] < 0 or min(layers[1:]) < 1:
                problems.append(f"{side}_layers_per_block={list(layers)}: the first stage may have 0 layers, "
                                f"the others need at least 1")
            for width, after, count in zip(widths, widths[1:], layers):
                if count and (4 * width) % after:  # the shortcut around the resampling averages/repeats channels
                    problems.append(f"{side}_block_out_channels={list(widths)}: 4·{width} is not divisible by {after}")
            for width, kind in zip(widths, getattr(self, f"{side}_block_types")):
                if kind == "EfficientViTBlock" and width < self.attention_head_dim:
                    problems.append(f"{side}: an EfficientViTBlock of width {width} has no head of "
                                    f"attention_head_dim={self.attention_head_dim}")
        if self.encoder_out_shortcut and self.encoder_block_out_channels[-1] % self.latent_channels:
            problems.append(f"encoder_out_shortcut needs encoder_block_out_channels[-1] divisible by "
                            f"latent_channels={self.latent_channels}")
        if self.decoder_in_shortcut and self.decoder_block_out_channels[-1] % self.latent_channels:
            problems.append(f"decoder_in_shortcut needs decoder_block_out_channels[-1] divisible by "
                            f"latent_channels={self.latent_channels}")
        if self.pixel_unshuffle and any(w % 4 for w in self.encoder_block_out_channels[1:]):
            problems.append(f"downsample_block_type='pixel_unshuffle' needs encoder_block_out_channels[1:] "
                            f"divisible by 4, got {list(self.encoder_block_out_channels)}")

    @property
    def pixel_unshuffle(self) -> bool:
        return self.downsample_block_type == "pixel_unshuffle"

    @property
    def interpolate(self) -> bool:
        return self.upsample_block_type == "interpolate"

    @property
    def factor(self) -> int:
        """The spatial downsampling f (32 for SANA's f32c32)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return self.in_channels


SANA_F32C32 = DCAEConfig(
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407,
)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, precision: Precision, rngs: nnx.Rngs,
         stride: int = 1, groups: int = 1, use_bias: bool = True) -> nnx.Conv:
    """nn.Conv2d(padding=k // 2): HWIO kernel [k, k, C_in / groups, C_out].

    x: [B, H, W, C_in] -> [B, H/s, W/s, C_out]
    """
    pad = kernel_size // 2
    axes = ("conv_window", "conv_window", "embed", "mlp")
    return nnx.Conv(
        in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=((pad, pad), (pad, pad)),
        feature_group_count=groups, use_bias=use_bias, dtype=precision.compute, param_dtype=precision.param,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)


class BiasedRMSNorm(RMSNorm):
    """diffusers' RMSNorm(elementwise_affine=True, bias=True) over channels, all in float32.

    x: [..., C] -> [..., C] in the compute dtype
    """

    def __init__(self, dim: int, *, precision: Precision):
        super().__init__(dim, "embed", eps=NORM_EPS, precision=precision)
        self.compute_dtype = precision.compute
        self.out_dtype = jnp.float32  # the shift is added before rounding to the compute dtype
        self.bias = nnx.Param(jnp.zeros((dim,), precision.param), out_sharding=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (super().__call__(x) + self.bias[...].astype(jnp.float32)).astype(self.compute_dtype)


def pixel_unshuffle(x: jax.Array) -> jax.Array:
    """F.pixel_unshuffle(·, 2) in NHWC: [B, 2H, 2W, C] -> [B, H, W, 4C], channel order (c, i, j) as torch's."""
    return einops.rearrange(x, "b (h i) (w j) c -> b h w (c i j)", i=2, j=2)


def pixel_shuffle(x: jax.Array) -> jax.Array:
    """F.pixel_shuffle(·, 2) in NHWC: [B, H, W, 4C] -> [B, 2H, 2W, C]."""
    return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=2, j=2)


def channel_mean(x: jax.Array, channels: int) -> jax.Array:
    """Average each run of consecutive channels down to `channels` (diffusers' unflatten + mean)."""
    return einops.reduce(x, "b h w (c g) -> b h w c", "mean", c=channels)


class ResBlock(nnx.Module):
    """x + norm(conv2(act(conv1(x)))), 3x3 convs. x: [B, H, W, C] -> [B, H, W, C]"""

    def __init__(self, channels: int, act_fn: str, *, precision: Precision, rngs: nnx.Rngs):
        self.act_fn = act_fn.lower()
        self.conv1 = conv(channels, channels, 3, precision=precision, rngs=rngs)
        self.conv2 = conv(channels, channels, 3, use_bias=False, precision=precision, rngs=rngs)
        self.norm = BiasedRMSNorm(channels, precision=precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.norm(self.conv2(ACTIVATIONS[self.act_fn](self.conv1(x))))


class MultiscaleProjection(nnx.Module):
    """One extra scale of q/k/v: depthwise k x k, then a 1x1 mixing within each head's d channels.

    x: [B, H, W, 3·inner] -> [B, H, W, 3·inner]
    """

    def __init__(self, channels: int, groups: int, kernel_size: int, *, precision: Precision, rngs: nnx.Rngs):
        self.proj_in = conv(channels, channels, kernel_size, groups=channels, use_bias=False, precision=precision,
                            rngs=rngs)
        self.proj_out = conv(channels, channels, 1, groups=groups, use_bias=False, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nnx.Module):
    """EfficientViT's ReLU linear attention over q/k/v at several scales, with output norm and residual.

    Heads are cut from the concatenation [q | k | v | scale 1 q|k|v | ...] in runs of 3·d channels, q, k
    and v of a head being its thirds: diffusers' layout (it makes "heads" that mix q, k and v channels
    of the projections; the weights were trained for it). The attention itself runs in float32.
    x: [B, H, W, C] -> [B, H, W, C]
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], *, precision: Precision,
                 rngs: nnx.Rngs):
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (
            dense(channels, inner, ("embed", "heads"), use_bias=False, precision=precision, rngs=rngs) for _ in "qkv")
        self.to_qkv_multiscale = nnx.List([MultiscaleProjection(3 * inner, 3 * heads, k, precision=precision, rngs=rngs)
                                           for k in kernel_sizes])
        self.to_out = dense(inner * (1 + len(kernel_sizes)), channels, ("heads", "embed"), use_bias=False,
                            precision=precision, rngs=rngs)
        self.norm_out = BiasedRMSNorm(channels, precision=precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = x.shape[1:3]
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        qkv = jnp.concatenate([qkv] + [scale(qkv) for scale in self.to_qkv_multiscale], axis=-1)
        q, k, v = einops.rearrange(qkv.astype(jnp.float32), "b h w (g three d) -> three b (h w) g d", three=3,
                                   d=self.head_dim)
        q, k = jax.nn.relu(q), jax.nn.relu(k)
        # A ones row under v gives the normaliser Σ_j k_j·q_i in the same contraction as the values.
        v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
        kv = jnp.einsum("bngd,bnge->bgde", k, v)
        out = jnp.einsum("bngd,bgde->bnge", q, kv)
        out = out[..., :-1] / (out[..., -1:] + LINEAR_ATTENTION_EPS)
        out = einops.rearrange(out, "b (h w) g e -> b h w (g e)", h=height, w=width).astype(x.dtype)
        return x + self.norm_out(self.to_out(out))


class ResidualGLUMBConv(GLUMBConv):
    """SANA's Mix-FFN (4x expansion) followed by an RMSNorm, plus the input. x: [B, H, W, C] -> [B, H, W, C]"""

    def __init__(self, channels: int, *, precision: Precision, rngs: nnx.Rngs):
        super().__init__(channels, FFN_EXPANSION * channels, precision=precision, rngs=rngs)
        self.norm = BiasedRMSNorm(channels, precision=precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.norm(super().__call__(x))


class EfficientViTBlock(nnx.Module):
    """Multi-scale linear attention then the gated conv FFN, each residual. x: [B, H, W, C] -> [B, H, W, C]"""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], *, precision: Precision,
                 rngs: nnx.Rngs):
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, precision=precision, rngs=rngs)
        self.conv_out = ResidualGLUMBConv(channels, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.attn(x))


class DownBlock(nnx.Module):
    """diffusers' DCDownBlock2d: halve H and W by a strided conv or a conv + pixel-unshuffle, plus
    (shortcut) the pixel-unshuffled input averaged down to the output width.

    x: [B, H, W, C_in] -> [B, H/2, W/2, C_out]
    """

    def __init__(self, in_channels: int, out_channels: int, *, pixel_unshuffle: bool, shortcut: bool,
                 precision: Precision, rngs: nnx.Rngs):
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.out_channels = out_channels
        if pixel_unshuffle:
            self.conv = conv(in_channels, out_channels // 4, 3, precision=precision, rngs=rngs)
        else:
            self.conv = conv(in_channels, out_channels, 3, stride=2, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = pixel_unshuffle(h)
        if self.shortcut:
            h = h + channel_mean(pixel_unshuffle(x), self.out_channels)
        return h


class UpBlock(nnx.Module):
    """diffusers' DCUpBlock2d: double H and W by nearest upsampling + conv or a conv + pixel-shuffle,
    plus (shortcut) the input with each channel repeated, pixel-shuffled.

    x: [B, H, W, C_in] -> [B, 2H, 2W, C_out]
    """

    def __init__(self, in_channels: int, out_channels: int, *, interpolate: bool, shortcut: bool,
                 precision: Precision, rngs: nnx.Rngs):
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = 4 * out_channels // in_channels
        self.conv = conv(in_channels, out_channels if interpolate else 4 * out_channels, 3, precision=precision,
                         rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.interpolate:
            h = self.conv(einops.repeat(x, "b h w c -> b (h i) (w j) c", i=2, j=2))
        else:
            h = pixel_shuffle(self.conv(x))
        if self.shortcut:
            h = h + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1))
        return h


def _stage_block(kind: str, channels: int, head_dim: int, kernel_sizes: Sequence[int], act_fn: str, *,
                 precision: Precision, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "ResBlock":
        return ResBlock(channels, act_fn, precision=precision, rngs=rngs)
    return EfficientViTBlock(channels, head_dim, kernel_sizes, precision=precision, rngs=rngs)


class Encoder(nnx.Module):
    """images [B, H, W, C_img] in [-1, 1] -> raw latents [B, H/f, W/f, latent_channels] (diffusers' encoder)."""

    def __init__(self, config: DCAEConfig, *, precision: Precision, rngs: nnx.Rngs):
        widths, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
        if layers[0] > 0:
            self.conv_in = conv(config.in_channels, widths[0], 3, precision=precision, rngs=rngs)
        else:  # the first stage is only its downsampling, folded into conv_in
            self.conv_in = DownBlock(config.in_channels, widths[1], pixel_unshuffle=config.pixel_unshuffle,
                                     shortcut=False, precision=precision, rngs=rngs)
        stages = []
        for i, (width, count) in enumerate(zip(widths, layers)):
            blocks = [_stage_block(config.encoder_block_types[i], width, config.attention_head_dim,
                                   config.encoder_qkv_multiscales[i], "silu", precision=precision, rngs=rngs)
                      for _ in range(count)]
            if i < len(widths) - 1 and count > 0:
                blocks.append(DownBlock(width, widths[i + 1], pixel_unshuffle=config.pixel_unshuffle, shortcut=True,
                                        precision=precision, rngs=rngs))
            stages.append(nnx.List(blocks))
        self.down_blocks = nnx.List(stages)
        self.conv_out = conv(widths[-1], config.latent_channels, 3, precision=precision, rngs=rngs)
        self.latent_channels = config.latent_channels
        self.out_shortcut = config.encoder_out_shortcut

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            for block in stage:
                h = block(h)
        out = self.conv_out(h)
        if self.out_shortcut:
            out = out + channel_mean(h, self.latent_channels)
        return out


class Decoder(nnx.Module):
    """raw latents [B, h, w, latent_channels] -> images [B, h·f, w·f, C_img], about [-1, 1], unclipped
    (diffusers' decoder)."""

    def __init__(self, config: DCAEConfig, *, precision: Precision, rngs: nnx.Rngs):
        widths, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
        self.conv_in = conv(config.latent_channels, widths[-1], 3, precision=precision, rngs=rngs)
        self.in_shortcut_repeats = widths[-1] // config.latent_channels if config.decoder_in_shortcut else 0
        stages = []
        for i, (width, count) in enumerate(zip(widths, layers)):
            blocks = []
            if i < len(widths) - 1 and count > 0:
                blocks.append(UpBlock(widths[i + 1], width, interpolate=config.interpolate, shortcut=True,
                                      precision=precision, rngs=rngs))
            blocks += [_stage_block(config.decoder_block_types[i], width, config.attention_head_dim,
                                    config.decoder_qkv_multiscales[i], config.decoder_act_fns[i],
                                    precision=precision, rngs=rngs) for _ in range(count)]
            stages.append(nnx.List(blocks))
        self.up_blocks = nnx.List(stages)  # indexed by stage, as diffusers', and run from the deepest
        channels = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = BiasedRMSNorm(channels, precision=precision)
        self.conv_act = config.decoder_conv_act_fn.lower()
        if layers[0] > 0:
            self.conv_out = conv(channels, config.in_channels, 3, precision=precision, rngs=rngs)
        else:
            self.conv_out = UpBlock(channels, config.in_channels, interpolate=config.interpolate, shortcut=False,
                                    precision=precision, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.conv_in(z)
        if self.in_shortcut_repeats:
            h = h + jnp.repeat(z, self.in_shortcut_repeats, axis=-1).astype(h.dtype)
        for stage in reversed(self.up_blocks):
            for block in stage:
                h = block(h)
        return self.conv_out(ACTIVATIONS[self.conv_act](self.norm_out(h)))


class DCAutoencoder(nnx.Module):
    """DC-AE with the interface of `SpaceToDepthAutoencoder`: images [B, H, W, C] in [0, 1] <-> raw
    latents [B, H/f, W/f, latent_channels] (training multiplies them by `config.scaling_factor`,
    sampling divides by it before `decode`).

    diffusers' AutoencoderDC works on pixels in [-1, 1]; `encode` maps [0, 1] to that range first and
    `decode` maps back and clips to [0, 1]. `encoder` / `decoder` are the bare networks on diffusers'
    range. Both methods return float32 whatever the compute dtype.
    """

    def __init__(self, config: DCAEConfig, *, precision: Precision = Precision(), rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        # Parameters carry logical axis names only; parallel/ maps them to a mesh when it shards.
        with nnx.use_eager_sharding(False):
            self.encoder = Encoder(config, precision=precision, rngs=rngs)
            self.decoder = Decoder(config, precision=precision, rngs=rngs)

    def encode(self, images: jax.Array) -> jax.Array:
        """images: float [B, H, W, C] in [0, 1], H and W multiples of f -> raw latents [B, H/f, W/f, latent_channels]"""
        cfg = self.config
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[3] != cfg.in_channels or shape[1] % cfg.factor or shape[2] % cfg.factor:
            raise ValueError(f"images of shape {shape} do not fit: expected [B, H, W, {cfg.in_channels}] with H "
                             f"and W multiples of factor={cfg.factor}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
        pixels = (2 * jnp.asarray(images, jnp.float32) - 1).astype(self.precision.compute)
        return self.encoder(pixels).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """raw latents [B, h, w, latent_channels] -> images [B, h·f, w·f, C] in [0, 1] (clipped), float32."""
        cfg = self.config
        shape = tuple(latents.shape)
        if len(shape) != 4 or shape[3] != cfg.latent_channels:
            raise ValueError(f"latents of shape {shape} do not fit: expected [B, h, w, {cfg.latent_channels}]")
        pixels = self.decoder(jnp.asarray(latents).astype(self.precision.compute)).astype(jnp.float32)
        return ((pixels + 1) / 2).clip(0, 1)
