"""Flow-matching training of a SANA teacher: what the distillation recipes start from.

Trains `model` (a flow SANA, no guidance embedding) to predict the velocity v = ε − x0 along
x_s = (1 − s)·x0 + s·ε, with SANA's logit-normal flow times. A fraction of the captions is replaced
by the frozen null caption so that the model also learns the unconditional velocity that
classifier-free guidance (and the sCM teacher) needs. Frozen: `null_caption` (and its mask).

Batch: {"latents": [B, H, W, C] unit-scale latents, "caption": [B, L, caption_channels],
        "caption_mask": [B, L]}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import per_example, standard_normal
from s2flash_jax.models.backbone import Backbone, build_backbone
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import null_caption_batch, null_caption_of, product_optimizer
from s2flash_jax.recipes.registry import RecipeEntry


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """time_mean/time_std: s = sigmoid(time_mean + time_std·n), n ~ N(0, 1) (SANA: logit_normal 0, 1).
    caption_dropout: probability that an example is trained on the null caption instead of its own."""

    time_mean: float = 0.0
    time_std: float = 1.0
    caption_dropout: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout < 1.0 or self.time_std <= 0:
            raise ValueError(f"flow_matching: caption_dropout ({self.caption_dropout}) must be in [0, 1) and "
                             f"time_std ({self.time_std}) > 0")


def null_captioned(key: jax.Array, caption: jax.Array, caption_mask: jax.Array, null_caption: jax.Array,
                   null_caption_mask: jax.Array | None, rate: float) -> tuple[jax.Array, jax.Array]:
    """caption [B, L, D] and mask [B, L] with each example replaced by the null caption with
    probability `rate` (see null_caption_batch)."""
    drop = jax.random.bernoulli(key, rate, (caption.shape[0],))
    null, null_mask = null_caption_batch(caption, caption_mask, null_caption, null_caption_mask)
    return (jnp.where(drop[:, None, None], null, caption), jnp.where(drop[:, None], null_mask, caption_mask))


def flow_matching(model: Backbone, null_caption: jax.Array, null_caption_mask: jax.Array | None = None,
                  config: FlowMatchingConfig = FlowMatchingConfig(),
                  optimizer: optax.GradientTransformation | None = None) -> tuple[Recipe, DistillState]:
    """The flow-matching recipe for `model` and its initial state.

    null_caption: [L, caption_channels], the unconditional caption the distillation recipes will pair
    with this model for guidance (L must be the batches' caption length).
    """
    if model.config.guidance_embeds or model.config.logvar_head:
        raise ValueError("flow-matching trains a teacher: the model needs guidance_embeds=False and logvar_head=False")
    if null_caption.ndim != 2 or null_caption.shape[1] != model.config.caption_channels:
        raise ValueError(f"null_caption has shape {null_caption.shape}; expected [L, {model.config.caption_channels}]")
    graph, params = nnx.split(model)

    def loss(params, state: DistillState, batch, key):
        net = nnx.merge(graph, params)
        x0 = batch["latents"].astype(jnp.float32)
        time_key, noise_key, drop_key = jax.random.split(key, 3)
        s = jax.nn.sigmoid(config.time_mean + config.time_std * jax.random.normal(time_key, (x0.shape[0],)))
        noise = standard_normal(noise_key, x0.shape, x0.dtype)
        x_s = (1 - per_example(s, x0)) * x0 + per_example(s, x0) * noise
        caption, mask = null_captioned(drop_key, batch["caption"], batch["caption_mask"], state.frozen["null_caption"],
                                       state.frozen["null_caption_mask"], config.caption_dropout)
        v = net(x_s, s, caption, mask)
        value = jnp.mean((v - (noise - x0)) ** 2)
        return value, ({"flow/mse": value}, {})

    recipe = Recipe(name="flow_matching", trains=("model",), frozen=("null_caption",),
                    phases={"flow": Phase("flow", "model", loss)}, cycle=("flow",),
                    optimizers={"model": optimizer or optax.adamw(1e-4)}, product="model")
    state = recipe.init_state(
        params={"model": params},
        frozen={"null_caption": jnp.asarray(null_caption),
                "null_caption_mask": None if null_caption_mask is None else jnp.asarray(null_caption_mask)})
    return recipe, state


def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    model = build_backbone(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    return flow_matching(model, null_caption_of(config, config.model.caption_channels), config=config.flow_matching,
                         optimizer=product_optimizer(config))


ENTRY = RecipeEntry("flow_matching", FlowMatchingConfig, build, teacher="none",
                    summary="flow-matching training of a teacher (SANA's objective)")
