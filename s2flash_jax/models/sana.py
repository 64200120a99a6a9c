"""The SANA / SANA-Sprint linear diffusion transformer (teacher and student), in Flax NNX.

Numerically the architecture of diffusers' `SanaTransformer2DModel`; images are NHWC and the
model returns the flow-matching velocity in float32. `SanaConfig` carries diffusers'
`config.json` keys one to one (plus keys of our own, see the dataclass).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.attention import CrossAttention, LinearSelfAttention
from s2flash_jax.models.backbone import CAPABILITIES, BackboneKind
from s2flash_jax.models.embeddings import CaptionProjection, TimestepMLP, sincos_pos_embed_2d, timestep_sinusoid
from s2flash_jax.models.layers import DepthwiseConv, LayerNorm, LoRA, RMSNorm, dense, layer_norm, modulate, stacked
from s2flash_jax.precision import Precision

QK_NORM_KINDS = (None, "rms_norm_across_heads")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# The linear layers of a block that can carry LoRA adapters, by diffusers' module names within a block.
LORA_LAYERS = (*(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ATTENTION_PROJECTIONS),
               "ff.conv_inverted", "ff.conv_point")
# What lora_targets may name: a layer, or a projection of both attentions (PEFT's target_modules
# rule: a target selects every layer whose name is it or ends in "." + it).
LORA_TARGETS = ATTENTION_PROJECTIONS + LORA_LAYERS


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """Architecture of a SANA transformer: diffusers' keys, names and defaults.

    Keys of our own (absent from diffusers' config.json, dropped on export):
      logvar_head: add SANA-Sprint's `logvar_linear` head (D -> 1 on the time embedding), used by the
        sCM loss's adaptive weighting.
      linear_attention_eps: the normaliser epsilon of linear attention (diffusers 1e-15; the original
        NVlabs `LiteLA` uses 1e-8).
      gradient_checkpointing: recompute each block in the backward pass instead of storing its
        activations (SANA-Sprint trains with it on); changes memory, not results.
      scan_unroll: blocks per iteration of the scan over layers. Unrolling a shallow model (the
        shapes demo's 2 blocks) lets XLA fuse across blocks, ~30% faster on CPU; deep models keep 1
        so compilation stays one block long. Changes speed, not results.
      twinflow_embeds: TwinFlow's any-step time conditioning: a second time embedding of the target
        time, gated by (|s| − |s_target|) in flow time so it vanishes at s_target = s, and a learned
        (zero-initialised) embedding of negative time, the twin branch's sign. A flow model with it
        equals the same model without it until those parameters train.
      lora_rank: the rank r of LoRA adapters on the block layers `lora_targets` selects (0: none). An
        adapted layer computes x·W + b + (alpha/r)·(x·A)·B with B zero-initialised, so a model with
        adapters equals the same model without them until they train (train only them with
        train.trainable=*/lora_[ab]; models/lora.py merges them into the base weights).
      lora_alpha: PEFT's lora_alpha; the update's scale is alpha / r. None: alpha = r (scale 1, as
        diffusers' LoRA training scripts set it).
      lora_targets: the adapted layers, by diffusers' module names (see LORA_TARGETS): "to_q" etc. name
        the projection in both attentions, "attn1.to_q" in one, "ff.conv_inverted" / "ff.conv_point"
        the Mix-FFN's 1x1 convolutions. Default: every attention projection.
    """

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0
    # Ours, not diffusers'.
    logvar_head: bool = False
    linear_attention_eps: float = 1e-15
    gradient_checkpointing: bool = False
    scan_unroll: int = 1
    twinflow_embeds: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS

    OWN_KEYS = ("logvar_head", "linear_attention_eps", "gradient_checkpointing", "scan_unroll", "twinflow_embeds",
                "lora_rank", "lora_alpha", "lora_targets")
    # Own keys that say how the model runs, not what it computes: checkpoints need not agree on them.
    EXECUTION_KEYS = ("gradient_checkpointing", "scan_unroll")
    # A model with adapters starts from a checkpoint without them (train.init_checkpoint).
    LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")

    def __post_init__(self):
        # model.json stores lists; a tuple keeps the config hashable and equal to the one it was saved from.
        targets = self.lora_targets
        object.__setattr__(self, "lora_targets", (targets,) if isinstance(targets, str) else tuple(targets))
        problems = []
        if self.qk_norm not in QK_NORM_KINDS:
            problems.append(f"qk_norm={self.qk_norm!r} is not supported; expected one of {QK_NORM_KINDS}")
        if self.dropout != 0.0:
            problems.append(f"dropout={self.dropout} is not supported; SANA models are trained with 0.0")
        for key in ("num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim"):
            if getattr(self, key) is None:
                problems.append(f"{key}=None is not supported; SANA blocks always have cross-attention")
        for key in ("in_channels", "num_attention_heads", "attention_head_dim", "num_layers", "caption_channels",
                    "sample_size", "patch_size", "scan_unroll"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be >= 1")
        if self.twinflow_embeds and self.guidance_embeds:
            problems.append("twinflow_embeds=True needs guidance_embeds=False (TwinFlow bakes guidance into the model)")
        problems += self._lora_problems()
        if self.interpolation_scale is not None and self.inner_dim % 4:
            problems.append(f"a positional embedding needs the width (heads x head_dim = {self.inner_dim}) "
                            "divisible by 4")
        if problems:
            raise ValueError("invalid SanaConfig: " + "; ".join(problems))

    def _lora_problems(self) -> list[str]:
        problems = []
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            problems.append(f"lora_targets {unknown} name no adaptable layer; expected some of {LORA_TARGETS}")
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0 (0: no adapters)")
        if self.lora_rank and not self.lora_targets:
            problems.append(f"lora_rank={self.lora_rank} needs at least one of lora_targets {LORA_TARGETS}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"lora_alpha={self.lora_alpha} must be > 0 (or None: alpha = lora_rank)")
        return problems

    @property
    def lora_layers(self) -> tuple[str, ...]:
        """The block layers (names of LORA_LAYERS) that carry adapters; () without adapters."""
        if not self.lora_rank:
            return ()
        return tuple(layer for layer in LORA_LAYERS
                     if any(layer == t or layer.endswith("." + t) for t in self.lora_targets))

    @property
    def lora(self) -> LoRA | None:
        """Every adapter's rank and alpha; None without adapters."""
        if not self.lora_rank:
            return None
        return LoRA(self.lora_rank, self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def adapters(self, prefix: str) -> dict[str, LoRA]:
        """The adapters of the block layers under `prefix` (e.g. "attn1."), keyed by the rest of their name."""
        return {layer.removeprefix(prefix): self.lora for layer in self.lora_layers if layer.startswith(prefix)}

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def few_step(self) -> bool:
        """A distilled student sampled in a few steps (SANA-Sprint's or TwinFlow's), not a flow model."""
        return self.guidance_embeds or self.twinflow_embeds

    @property
    def flow_time_scale(self) -> float:
        """What the time embedder is fed per unit of flow time s, as the diffusers pipeline serving the
        checkpoint feeds it: SANA-Sprint students (guidance_embeds, `SanaSprintPipeline`) see s itself;
        flow models (`SanaPipeline`) see 1000·s·timestep_scale, i.e. 1000·s for base SANA and s for
        the Sprint teacher's dense time embedding (timestep_scale=0.001)."""
        return 1.0 if self.guidance_embeds else 1000.0 * self.timestep_scale

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def ffn_hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **own_keys) -> SanaConfig:
        """Build from a diffusers `config.json` dict; keys starting with '_' are diffusers bookkeeping."""
        fields = {f.name for f in dataclasses.fields(cls)} - set(cls.OWN_KEYS)
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - fields)
        if unknown:
            hints = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
            listed = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"diffusers config has keys SanaTransformer2DModel does not define: {listed}")
        return cls(**values, **own_keys)

    def to_diffusers(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.OWN_KEYS}


class TimeEmbedding(nnx.Module):
    """Time (+ optional guidance) embedding and the shared adaLN-single projection.

    timestep: [B], guidance: [B] or None -> (modulation [B, 6D], temb [B, D])
    """

    def __init__(self, dim: int, guidance_embeds: bool, *, precision: Precision, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepMLP(dim, precision=precision, rngs=rngs)
        self.guidance_embedder = TimestepMLP(dim, precision=precision, rngs=rngs) if guidance_embeds else None
        self.linear = dense(dim, 6 * dim, ("embed", "adaln"), precision=precision, rngs=rngs,
                            kernel_init=nnx.initializers.normal(0.02))

    def __call__(self, timestep: jax.Array, guidance: jax.Array | None,
                 negative_time: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """negative_time: [B, D] added to the time embedding before the projection (TwinFlow's sign)."""
        temb = self.timestep_embedder(timestep_sinusoid(timestep))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance))
        if negative_time is not None:
            temb = temb + negative_time.astype(temb.dtype)
        return self.linear(jax.nn.silu(temb)), temb


class TwinTimeEmbedding(nnx.Module):
    """TwinFlow's any-step conditioning on top of a TimeEmbedding (inclusionAI/TwinFlow's SANA
    variant): the target time's own adaLN-single embedding scaled by the jump length in flow time,
    so a jump of length 0 is the plain flow model, and a learned embedding of the sign of time.

    (modulation [B, 6D], temb [B, D]) of |s|, s [B] signed flow time, target [B] signed flow time,
    flow_time_scale (the time embedders' units per unit of s) -> (modulation, temb)
    """

    def __init__(self, dim: int, *, precision: Precision, rngs: nnx.Rngs):
        self.target = TimeEmbedding(dim, False, precision=precision, rngs=rngs)
        self.negative_time = nnx.Param(jnp.zeros((dim,), precision.param), out_sharding=("embed",))

    def sign_embedding(self, s: jax.Array) -> jax.Array:
        """[B] signed time -> [B, D]: the negative-time embedding where s < 0, else 0."""
        return jnp.where((s < 0)[:, None], self.negative_time[...].astype(jnp.float32)[None], 0.0)

    def __call__(self, modulation: jax.Array, temb: jax.Array, s: jax.Array, target: jax.Array,
                 flow_time_scale: float) -> tuple[jax.Array, jax.Array]:
        target_modulation, target_temb = self.target(jnp.abs(target) * flow_time_scale, None)
        gate = (jnp.abs(s) - jnp.abs(target))[:, None]
        return (modulation + (gate * target_modulation).astype(modulation.dtype),
                temb + (gate * target_temb).astype(temb.dtype))


class PatchEmbed(nnx.Module):
    """p x p patches -> tokens (a strided conv as a matmul), plus the optional sin-cos position embedding.

    x: [B, H, W, C] -> [B, (H/p)·(W/p), D]
    """

    def __init__(self, config: SanaConfig, *, precision: Precision, rngs: nnx.Rngs):
        p = config.patch_size
        self.patch_size = p
        self.base_size = config.sample_size // p
        self.interpolation_scale = config.interpolation_scale
        self.proj = dense(p * p * config.in_channels, config.inner_dim, ("patch_in", "embed"), precision=precision,
                          rngs=rngs, kernel_init=nnx.initializers.xavier_uniform())

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        tokens = self.proj(einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p))
        if self.interpolation_scale is None:
            return tokens
        pos = sincos_pos_embed_2d(tokens.shape[-1], x.shape[1] // p, x.shape[2] // p, self.base_size,
                                  self.interpolation_scale)
        return (tokens.astype(jnp.float32) + pos[None]).astype(tokens.dtype)


class GLUMBConv(nnx.Module):
    """SANA's Mix-FFN: 1x1 expand -> SiLU -> depthwise 3x3 -> gated (value·SiLU(gate)) -> 1x1 project.

    adapters: LoRA adapters by diffusers' module name ("conv_inverted", "conv_point").
    x: [B, H, W, D] -> [B, H, W, D]
    """

    def __init__(self, dim: int, hidden: int, *, precision: Precision, rngs: nnx.Rngs,
                 adapters: Mapping[str, LoRA] | None = None):
        adapters = adapters or {}  # DC-AE's blocks reuse this layer without adapters
        self.conv_inverted = dense(dim, 2 * hidden, ("embed", "mlp"), precision=precision, rngs=rngs,
                                   lora=adapters.get("conv_inverted"))
        self.conv_depth = DepthwiseConv(2 * hidden, 3, precision=precision, rngs=rngs)
        self.conv_point = dense(hidden, dim, ("mlp", "embed"), use_bias=False, precision=precision, rngs=rngs,
                                lora=adapters.get("conv_point"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        value, gate = jnp.split(h, 2, axis=-1)
        return self.conv_point(value * jax.nn.silu(gate))


class SanaBlock(nnx.Module):
    """adaLN-single modulated linear self-attention, unmodulated cross-attention, modulated Mix-FFN.

    h: [B, N, D], modulation: [B, 6D], caption: [B, L, D], caption_mask: [B, L] -> [B, N, D]
    """

    def __init__(self, config: SanaConfig, *, precision: Precision, rngs: nnx.Rngs):
        dim = config.inner_dim
        qk_norm = config.qk_norm is not None
        self.norm_eps = config.norm_eps
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (6, dim), precision.param) / dim**0.5, out_sharding=("table", "embed"))
        self.attn1 = LinearSelfAttention(
            dim, config.num_attention_heads, config.attention_head_dim, bias=config.attention_bias, qk_norm=qk_norm,
            eps=config.linear_attention_eps, precision=precision, rngs=rngs, adapters=config.adapters("attn1."))
        self.attn2 = CrossAttention(
            dim, config.cross_attention_dim, config.num_cross_attention_heads, config.cross_attention_head_dim,
            qk_norm=qk_norm, precision=precision, rngs=rngs, adapters=config.adapters("attn2."))
        # PixArt/SANA start every block as the identity on the text path.
        self.attn2.to_out.kernel[...] = jnp.zeros_like(self.attn2.to_out.kernel[...])
        self.norm2 = LayerNorm(dim, eps=config.norm_eps, affine=config.norm_elementwise_affine, precision=precision)
        self.ff = GLUMBConv(dim, config.ffn_hidden_dim, precision=precision, rngs=rngs, adapters=config.adapters("ff."))

    def __call__(self, h: jax.Array, modulation: jax.Array, caption: jax.Array, caption_mask: jax.Array | None,
                 grid: tuple[int, int]) -> jax.Array:
        # Modulation in float32; the residual stream stays in the compute dtype.
        table = self.scale_shift_table[...].astype(jnp.float32)[None] + einops.rearrange(
            modulation.astype(jnp.float32), "b (six d) -> b six d", six=6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(table, 6, axis=1)
        u = modulate(layer_norm(h, self.norm_eps), shift_msa, scale_msa).astype(h.dtype)
        h = h + (gate_msa * self.attn1(u)).astype(h.dtype)
        h = h + self.attn2(h, caption, caption_mask)
        u = modulate(self.norm2(h), shift_mlp, scale_mlp).astype(h.dtype)
        u = einops.rearrange(u, "b (h w) d -> b h w d", h=grid[0], w=grid[1])
        ff = einops.rearrange(self.ff(u), "b h w d -> b (h w) d")
        return h + (gate_mlp * ff).astype(h.dtype)


class SanaTransformer(nnx.Module):
    """The SANA linear DiT. Blocks are stacked on a leading `layers` axis and run with a scan
    (one compiled block, whatever the depth).

    __call__(x, s, caption, caption_mask=None, guidance=None, target_s=None) -> velocity
      x: [B, H, W, C_in] latents (H, W multiples of patch_size)
      s: [B] or scalar flow time in [0, 1] (1 = noise; signed with twinflow_embeds: negative time is
        the twin branch). Every caller speaks this one convention; the model feeds its time
        embedder s·config.flow_time_scale, the serving pipeline's units (1000·s for base SANA),
        which belong to the checkpoint and appear only where checkpoints cross to diffusers.
      caption: [B, L, caption_channels]; caption_mask: [B, L] 1 = token, 0 = padding
      guidance: [B] guidance-embedder input (already times guidance_embeds_scale), required iff
        config.guidance_embeds
      target_s: [B] the flow time the average velocity jumps to (signed like s), required iff
        config.twinflow_embeds
      pooled: None (the Backbone protocol's pooled text embeddings; SANA has no pooled projection)
      returns [B, H, W, C_out] float32, and with return_logvar=True also logvar [B] float32.
    """

    def __init__(self, config: SanaConfig, *, precision: Precision = Precision(), rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        dim = config.inner_dim
        p = config.patch_size
        # Parameters carry logical axis names only; parallel/ maps them to a mesh when it shards.
        with nnx.use_eager_sharding(False):
            self.patch_embed = PatchEmbed(config, precision=precision, rngs=rngs)
            self.time_embed = TimeEmbedding(dim, config.guidance_embeds, precision=precision, rngs=rngs)
            self.twin_time_embed = (TwinTimeEmbedding(dim, precision=precision, rngs=rngs)
                                    if config.twinflow_embeds else None)
            self.caption_projection = CaptionProjection(config.caption_channels, dim, precision=precision, rngs=rngs)
            self.caption_norm = RMSNorm(dim, "embed", eps=1e-5, precision=precision)
            self.transformer_blocks = stacked(lambda r: SanaBlock(config, precision=precision, rngs=r),
                                              config.num_layers, rngs)
            self.scale_shift_table = nnx.Param(
                jax.random.normal(rngs.params(), (2, dim), precision.param) / dim**0.5,
                out_sharding=("table", "embed"))
            self.proj_out = dense(dim, p * p * config.output_channels, ("embed", "patch_out"), precision=precision,
                                  rngs=rngs, kernel_init=nnx.initializers.zeros_init())
            self.logvar_linear = (
                dense(dim, 1, ("embed", "scalar"), precision=precision, rngs=rngs,
                      kernel_init=nnx.initializers.xavier_uniform())
                if config.logvar_head else None)

    def __call__(self, x: jax.Array, s: jax.Array, caption: jax.Array, caption_mask: jax.Array | None = None,
                 guidance: jax.Array | None = None, target_s: jax.Array | None = None, *,
                 pooled: jax.Array | None = None, return_logvar: bool = False):
        if pooled is not None:
            raise ValueError("SANA takes no pooled text embeddings (pooled must be None)")
        if return_logvar and self.logvar_linear is None:
            raise ValueError("return_logvar=True needs a model built with logvar_head=True")
        h, modulation, temb, caption, grid = self._embed(x, s, caption, guidance, target_s)
        h = self._run_blocks(h, 0, self.config.num_layers, modulation, caption, caption_mask, grid)

        p = self.config.patch_size
        shift, scale = jnp.split(self.scale_shift_table[...].astype(jnp.float32)[None]
                                 + temb.astype(jnp.float32)[:, None], 2, axis=1)
        h = modulate(layer_norm(h, 1e-6), shift, scale).astype(self.precision.compute)
        out = einops.rearrange(self.proj_out(h), "b (h w) (p q c) -> b (h p) (w q) c", h=grid[0], p=p, q=p)
        out = out.astype(jnp.float32)
        if return_logvar:
            return out, self.logvar_linear(temb)[:, 0].astype(jnp.float32)
        return out

    def block_features(self, x: jax.Array, s: jax.Array, caption: jax.Array,
                       caption_mask: jax.Array | None = None, guidance: jax.Array | None = None,
                       target_s: jax.Array | None = None, *, block_ids: Sequence[int]) -> list[jax.Array]:
        """Token features after each block in `block_ids` (0-based), for discriminator heads.

        Runs only up to the deepest requested block. Same inputs as __call__; returns a list of
        [B, N, D] in the compute dtype, N = (H/p)·(W/p), in the order of `block_ids`.
        """
        ids = sorted(set(block_ids))
        if not ids or ids[0] < 0 or ids[-1] >= self.config.num_layers:
            raise ValueError(f"block_ids {list(block_ids)} must name blocks in [0, {self.config.num_layers})")
        h, modulation, _, caption, grid = self._embed(x, s, caption, guidance, target_s)
        features, done = {}, 0
        for i in ids:
            h = self._run_blocks(h, done, i + 1, modulation, caption, caption_mask, grid)
            features[i], done = h, i + 1
        return [features[i] for i in block_ids]

    def _embed(self, x, s, caption, guidance, target_s):
        """Checks inputs; returns tokens [B, N, D], modulation, temb [B, D], caption tokens, grid (H/p, W/p)."""
        cfg = self.config
        batch, height, width, channels = x.shape
        p = cfg.patch_size
        if height % p or width % p or channels != cfg.in_channels:
            raise ValueError(f"latents {x.shape} do not fit the model: expected [B, H, W, {cfg.in_channels}] with "
                             f"H and W multiples of patch_size={p}")
        if (guidance is None) == cfg.guidance_embeds:
            raise ValueError("guidance must be given exactly when the config has guidance_embeds=True "
                             f"(guidance_embeds={cfg.guidance_embeds}, guidance given: {guidance is not None})")
        if (target_s is None) == cfg.twinflow_embeds:
            raise ValueError("target_s must be given exactly when the config has twinflow_embeds=True "
                             f"(twinflow_embeds={cfg.twinflow_embeds}, target given: {target_s is not None})")
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (batch,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))
        compute = self.precision.compute
        h = self.patch_embed(x.astype(compute))
        if self.twin_time_embed is None:
            modulation, temb = self.time_embed(s * cfg.flow_time_scale, guidance)
        else:
            target_s = jnp.broadcast_to(jnp.asarray(target_s, jnp.float32), (batch,))
            modulation, temb = self.time_embed(jnp.abs(s) * cfg.flow_time_scale, guidance,
                                               self.twin_time_embed.sign_embedding(s))
            modulation, temb = self.twin_time_embed(modulation, temb, s, target_s, cfg.flow_time_scale)
        caption = self.caption_norm(self.caption_projection(caption.astype(compute)))
        return h, modulation, temb, caption, (height // p, width // p)

    def _run_blocks(self, h, start, stop, modulation, caption, caption_mask, grid):
        """Blocks start..stop-1 as one scan over their slice of the stacked parameters."""
        graphdef, blocks = nnx.split(self.transformer_blocks)
        if (start, stop) != (0, self.config.num_layers):
            blocks = jax.tree.map(lambda a: a[start:stop], blocks)

        def run_block(h, block_state):
            return nnx.merge(graphdef, block_state)(h, modulation, caption, caption_mask, grid), None

        if self.config.gradient_checkpointing:
            # Keep only each block's input for the backward pass; inside a scan CSE cannot undo it.
            run_block = jax.checkpoint(run_block, prevent_cse=False)

        h, _ = jax.lax.scan(run_block, h, blocks, unroll=self.config.scan_unroll)
        return h


# Quantization (quantize.py): the first and the last layer stay in full precision by default, as
# weight quantization usually leaves them: patch_embed reads the latents and proj_out writes the
# velocity, so their error is not diluted in the residual stream of the blocks; and they are tiny
# (in·D and D·out weights: under 0.01% of SANA-Sprint 1.6B's). On the shapes student proj_out is the most sensitive group at int8
# and int4, patch_embed among the four most (docs/quantization.md).
QUANTIZATION_KEEP = ("patch_embed/*", "proj_out")
# The groups a sensitivity sweep quantizes one at a time; each is a keep pattern. logvar_linear is
# in none: only training reads it.
SENSITIVITY_GROUPS = (
    "patch_embed/*", "time_embed/timestep_embedder/*", "time_embed/guidance_embedder/*", "time_embed/linear",
    "twin_time_embed/*", "caption_projection/*",
    *(f"transformer_blocks/{layer}" for layer in (
        "attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out", "attn2/to_q", "attn2/to_k", "attn2/to_v",
        "attn2/to_out", "ff/conv_inverted", "ff/conv_point")),
    "proj_out",
)


# A student started from its teacher gets these of its own parameters zeroed, so that at step 0 it
# computes exactly the teacher's velocity, whatever its guidance input. Only the guidance embedder's
# output layer: zeroing its input layer too (diffusers' training script zeroes all four tensors)
# leaves silu(0) = 0 between the two, and neither would ever get a gradient. The logvar head, which
# weights the sCM loss and does not enter the velocity, keeps its xavier initialisation: zeroed, it
# made the shapes student's 1-step Fréchet distance 132 instead of 35 (docs/teacher.md).
BACKBONE = BackboneKind("sana", SanaConfig, SanaTransformer, capabilities=frozenset(CAPABILITIES),
                        zeroed_in_new_student=("time_embed/guidance_embedder/linear_2/",),
                        lora_targets=LORA_TARGETS, quantization_keep=QUANTIZATION_KEEP,
                        sensitivity_groups=SENSITIVITY_GROUPS, converters="conversion.sana_diffusers")
