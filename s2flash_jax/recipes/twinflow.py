"""TwinFlow: a one-to-four-step SANA from a flow-matching SANA with no teacher and no discriminator.

Trains: `student`, a SANA transformer with twinflow_embeds (target-time and negative-time
embeddings, models/sana.py), started from the flow model's weights, so at step 0 it is that flow
model. Frozen: the null caption (the unconditional branch of the baked-in guidance). Stats:
`twinflow_target`, the target network of the loss (an EMA of the student with its warming decay),
checkpointed with the run so a resumed run continues the same EMA. One phase, "generator"
(losses/twinflow.py).

Batch: {"latents": [B, H, W, C] unit-scale latents, "caption", "caption_mask"}; captions only with
`image_free` (the model's own one-step samples are the data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.losses.twinflow import TwinFlowConfig, twinflow_loss
from s2flash_jax.models.backbone import Backbone, kind_of
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import null_caption_batch, null_caption_of, product_optimizer, student_and_teacher, student_from_teacher
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry

TARGET = "twinflow_target"


def next_target(target: dict, params, config: TwinFlowConfig) -> dict:
    """The target network for this step: {"params", "decay"} after the EMA takes in the current
    parameters with the current decay, which then warms up as the release's,
    d ← d + (1 − d)(d_target − d)/2 from 0. A decay of 1 keeps the initial copy."""
    if config.target_ema_decay == 1.0:
        return target
    d = target["decay"]
    ema = optax.incremental_update(jax.lax.stop_gradient(params), target["params"], 1.0 - d)
    return {"params": ema, "decay": d + (1.0 - d) * (config.target_ema_decay - d) * 0.5}


def twinflow(student: Backbone, null_caption: jax.Array, config: TwinFlowConfig = TwinFlowConfig(),
             optimizer: optax.GradientTransformation | None = None) -> tuple[Recipe, DistillState]:
    """The TwinFlow recipe over `student` (already holding the flow model's weights), and its state.

    null_caption: [L, caption_channels] paired with each prompt's mask; optimizer defaults to the
    release's AdamW (lr 1e-4, betas 0.9 / 0.99, no weight decay, clipped at 1).
    """
    mcfg = student.config
    if not mcfg.twinflow_embeds or mcfg.logvar_head:
        raise ValueError("TwinFlow trains a SANA with twinflow_embeds=True (and guidance_embeds=False, "
                         "logvar_head=False); set them in the config's model")
    if null_caption.ndim != 2 or null_caption.shape[1] != mcfg.caption_channels:
        raise ValueError(f"null_caption has shape {null_caption.shape}; expected [L, {mcfg.caption_channels}]")
    graph, params = nnx.split(student)

    def generator_loss(params, state: DistillState, batch, key):
        caption, mask = batch["caption"], batch["caption_mask"]
        null, null_mask = null_caption_batch(caption, mask, state.frozen["null_caption"],
                                             state.frozen["null_caption_mask"])

        def model(p, x_s, s, r, conditional):
            net = nnx.merge(graph, p)
            return net(x_s, s, caption if conditional else null, mask if conditional else null_mask, target_s=r)

        target = None
        if config.target_ema_decay > 0:
            target = next_target(state.stats[TARGET], params, config)
        if config.image_free:
            shape = (caption.shape[0], mcfg.sample_size, mcfg.sample_size, mcfg.in_channels)
            x = jnp.zeros(shape, jnp.float32)
        else:
            x = batch["latents"].astype(jnp.float32)
        loss, metrics = twinflow_loss(model, params, None if target is None else target["params"], x, key, config)
        if target is None:
            return loss, (metrics, {})
        return loss, ({**metrics, "twinflow/target_decay": target["decay"]}, {TARGET: target})

    recipe = Recipe(name="twinflow", trains=("student",), frozen=("null_caption",),
                    phases={"generator": Phase("generator", "student", generator_loss)}, cycle=("generator",),
                    optimizers={"student": optimizer or optax.chain(
                        optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.0))},
                    product="student", needs_latents=not config.image_free)
    stats = {}
    if config.target_ema_decay > 0:
        stats[TARGET] = {"params": jax.tree.map(jnp.copy, params), "decay": jnp.zeros((), jnp.float32)}
    state = recipe.init_state(params={"student": params},
                              frozen={"null_caption": jnp.asarray(null_caption), "null_caption_mask": None},
                              stats=stats)
    return recipe, state


def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """TwinFlow keeps no teacher: the flow model (config.teacher) only gives the student its weights."""
    student, teacher = student_and_teacher(config, seeds, teacher_params)
    if config.train.init_student_from_teacher:
        nnx.update(student, student_from_teacher(nnx.state(teacher), nnx.state(student),
                                                  kind_of(config.model).zeroed_in_new_student))
    return twinflow(student, null_caption_of(config, config.model.caption_channels), config=config.twinflow,
                    optimizer=product_optimizer(config))


ENTRY = RecipeEntry("twinflow", TwinFlowConfig, build, teacher="initialises",
                    summary="TwinFlow: the model's own twin branch, no teacher and no discriminator",
                    demo=DemoEntry("twinflow", "twinflow", "student-twinflow", "TwinFlow student"))
