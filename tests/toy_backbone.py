"""A second backbone, for tests only: a per-pixel MLP denoiser conditioned on time, guidance and the
mean caption token. It goes through the backbone registry like SANA and has only some of the
capabilities (guidance embedding, logvar head; no block features, no twin branch), which is the
proof that the Backbone protocol is all the engine needs. Importing this module registers it."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.backbone import GUIDANCE_EMBEDDING, LOGVAR_HEAD, BackboneKind, register_backbone
from s2flash_jax.models.layers import dense
from s2flash_jax.precision import Precision


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = ()
    LORA_KEYS: ClassVar[tuple[str, ...]] = ("lora_rank",)
    in_channels: int = 4
    caption_channels: int = 32
    sample_size: int = 8
    patch_size: int = 1
    num_layers: int = 2
    width: int = 32
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    logvar_head: bool = False
    twinflow_embeds: bool = False
    lora_rank: int = 0

    inner_dim = property(lambda self: self.width)
    output_channels = property(lambda self: self.in_channels)
    few_step = property(lambda self: self.guidance_embeds)
    flow_time_scale = property(lambda self: 1.0)


class ToyDenoiser(nnx.Module):
    def __init__(self, config: ToyConfig, *, precision: Precision = Precision(), rngs: nnx.Rngs):
        self.config, d = config, config.width
        layer = lambda i, o, axes, **kw: dense(i, o, axes, precision=precision, rngs=rngs, **kw)  # noqa: E731
        self.pixel_in = layer(config.in_channels, d, ("patch_in", "embed"))
        self.time_in = layer(2, d, ("scalar", "embed"))
        self.caption_in = layer(config.caption_channels, d, ("caption", "embed"))
        self.guidance_in = layer(1, d, ("scalar", "embed")) if config.guidance_embeds else None
        self.blocks = nnx.List([layer(d, d, ("embed", "mlp")) for _ in range(config.num_layers)])
        self.pixel_out = layer(d, config.in_channels, ("embed", "patch_out"), kernel_init=nnx.initializers.zeros_init())
        self.logvar = layer(d, 1, ("embed", "scalar")) if config.logvar_head else None

    def __call__(self, x, s, caption, caption_mask=None, guidance=None, target_s=None, *, pooled=None,
                 return_logvar=False):
        """x: [B, H, W, C]; s: [B] or []; caption: [B, L, Cc]; returns velocity [B, H, W, C] float32."""
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape[:1])
        mask = jnp.ones(caption.shape[:2]) if caption_mask is None else caption_mask.astype(jnp.float32)
        pooled = (caption * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
        condition = self.time_in(jnp.stack([jnp.sin(s), jnp.cos(s)], -1)) + self.caption_in(pooled)
        if self.guidance_in is not None:
            condition = condition + self.guidance_in(guidance[:, None])
        h = self.pixel_in(x) + condition[:, None, None]
        for block in self.blocks:
            h = h + jax.nn.gelu(block(h))
        out = self.pixel_out(h).astype(jnp.float32)
        if return_logvar:
            return out, self.logvar(condition)[:, 0].astype(jnp.float32)
        return out

    def block_features(self, *args, **kwargs):
        raise NotImplementedError("the toy backbone has no block features")


TOY = register_backbone(BackboneKind(
    "toy", ToyConfig, ToyDenoiser, capabilities=frozenset({GUIDANCE_EMBEDDING, LOGVAR_HEAD}),
    zeroed_in_new_student=("guidance_in/",)))
