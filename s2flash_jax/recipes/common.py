"""What several recipes share: the student and teacher as TrigFlow functions, the checks a
consistency student and its teacher must pass, the reference optimizer, the null-caption batch,
the few-step schedule, the conv discriminator on teacher blocks, and the pieces every recipe's
builder uses to turn a run config into networks. Recipes import this, never each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from s2flash_jax.flows.trigflow import SIGMA_DATA, flow_input, scm_timesteps, trigflow_from_flow_matching
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.models.backbone import (
    BLOCK_FEATURES, Backbone, BackboneConfig, build_backbone, kind_of, missing_capabilities)
from s2flash_jax.models.discriminator import ConvDiscriminatorHeads
from s2flash_jax.recipes.base import DistillState, phase_count
from s2flash_jax.train.optim import optimizer, optimizer_from_config


def reference_optimizer(learning_rate: float | optax.Schedule = 2e-6, clip_norm: float = 0.1,
                        max_consecutive_skips: int = 100) -> optax.GradientTransformation:
    """The SANA-Sprint yamls' optimizer for both networks: CAME (0.9, 0.999, 0.9999), eps (1e-30, 1e-16),
    no weight decay, after global-norm clipping at 0.1.

    Like NVlabs, an update whose gradient is not finite is skipped (parameters and moments unchanged)
    and counted in the state's `total_notfinite`.
    """
    return optimizer("came", learning_rate, clip_norm=clip_norm, max_consecutive_skips=max_consecutive_skips)


def null_caption_batch(caption: jax.Array, caption_mask: jax.Array, null_caption: jax.Array,
                       null_caption_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The unconditional batch for captions [B, L, D] / mask [B, L]: the null caption [L, D] in every
    row, with its mask [L], or with each prompt's own mask when that is None (as NVlabs pairs them)."""
    if null_caption.shape[0] != caption.shape[1]:
        raise ValueError(f"batch captions have {caption.shape[1]} tokens but the null caption has "
                         f"{null_caption.shape[0]}; pad both to the same length")
    null = jnp.broadcast_to(null_caption, caption.shape).astype(caption.dtype)
    mask = caption_mask if null_caption_mask is None else jnp.broadcast_to(
        null_caption_mask, caption_mask.shape).astype(caption_mask.dtype)
    return null, mask


@dataclasses.dataclass(frozen=True)
class TrigFlowNetworks:
    """Graph definitions (static) that turn parameter pytrees back into the callables every
    consistency recipe needs: the student's and the frozen teacher's TrigFlow functions."""

    student: Any
    teacher: Any

    def student_fn(self, batch):
        """(params, x̂ [B, ...], t [B], w [B]) -> (F, logvar [B]) for the batch's captions."""

        def student(params, x_hat, t, guidance_scale):
            net = nnx.merge(self.student, params)
            mcfg = net.config

            def flow(x_flow, s):
                return net(x_flow, s, batch["caption"], batch["caption_mask"],
                           guidance_scale * mcfg.guidance_embeds_scale, return_logvar=True)

            return trigflow_from_flow_matching(flow, has_aux=True)(x_hat, t)

        return student

    def frozen_teacher(self, state: DistillState) -> Backbone:
        """The teacher with its parameters under stop_gradient: it never receives a gradient."""
        return nnx.merge(self.teacher, jax.lax.stop_gradient(state.frozen["teacher"]))

    def teacher_fn(self, state: DistillState, batch):
        """(x̂, t) -> (F unconditional, F conditional), one teacher call on the doubled batch."""
        net = self.frozen_teacher(state)
        caption, mask = batch["caption"], batch["caption_mask"]
        null, null_mask = null_caption_batch(caption, mask, state.frozen["null_caption"],
                                             state.frozen["null_caption_mask"])
        captions, masks = jnp.concatenate([null, caption]), jnp.concatenate([null_mask, mask])

        def teacher(x_hat, t):
            def flow(x_flow, s):
                return net(x_flow, s, captions, masks)

            both = trigflow_from_flow_matching(flow)(jnp.concatenate([x_hat, x_hat]), jnp.concatenate([t, t]))
            return jnp.split(both, 2)

        return teacher


def check_student_and_teacher(student: Backbone, teacher: Backbone, scm: SCMConfig,
                              null_caption: jax.Array | None = None) -> list[str]:
    """What keeps a SANA-Sprint-style student from being distilled from `teacher` (with this
    unconditional caption [L, caption_channels], when given), as messages."""
    s, t = student.config, teacher.config
    problems = []
    if null_caption is not None and (null_caption.ndim != 2 or null_caption.shape[1] != t.caption_channels):
        problems.append(f"null_caption has shape {null_caption.shape}; expected [L, {t.caption_channels}] "
                        "(caption length, caption_channels)")
    if not (s.guidance_embeds and s.logvar_head):
        problems.append("the student needs guidance_embeds=True and logvar_head=True")
    if t.guidance_embeds:
        problems.append("the teacher must be a flow model without guidance embedding (guidance_embeds=False)")
    if s.flow_time_scale != t.flow_time_scale:
        problems.append(f"the teacher's time embedder is fed {t.flow_time_scale:g}·s "
                        f"but the student's {s.flow_time_scale:g}·s: a SANA-Sprint student uses the dense time "
                        "embedding (s itself); convert the teacher with `s2flash prepare-teacher`")
    # Backbones without query/key norms have nothing to disagree on.
    if getattr(s, "qk_norm", None) != getattr(t, "qk_norm", None):
        problems.append(f"the student has qk_norm={s.qk_norm!r} but the teacher {t.qk_norm!r}: a student copied from "
                        "it would start with untrained norms; add them to the teacher with `s2flash prepare-teacher`")
    if s.inner_dim != t.inner_dim or s.in_channels != t.in_channels:
        problems.append(f"student and teacher differ in width or latent channels "
                        f"({s.inner_dim}/{s.in_channels} vs {t.inner_dim}/{t.in_channels})")
    if scm.sigma_data != SIGMA_DATA:
        problems.append(f"sigma_data={scm.sigma_data}: the TrigFlow wrapper of a flow teacher assumes {SIGMA_DATA}")
    return problems


def require_block_features(teacher: BackboneConfig, what: str, remedy: str) -> None:
    """ValueError, in one line, for an adversary on the teacher's block features (`what`) when the
    teacher's backbone kind has none; `remedy` says how to run without it."""
    if missing_capabilities(teacher, [BLOCK_FEATURES]):
        raise ValueError(f"{what} needs the teacher's block features, which a {kind_of(teacher).name} backbone "
                         f"does not have; {remedy}")


def step_schedule(steps: int, shift: float) -> tuple[float, ...]:
    """The sampler's times (steps + 1 of them), τ_0 = MAX_TIME > … > τ_steps = 0, each the float32
    value `few_step_sample(steps=steps, flow_shift=shift)` visits."""
    return tuple(float(t) for t in np.asarray(scm_timesteps(steps, shift=shift), np.float32))


def phase_updates_before(step: jax.Array, cycle: Sequence[str], phase: str) -> jax.Array:
    """How many of the global updates 0 … step − 1 were `phase` updates. step: int [...] (traced or not)."""
    in_prefix = np.asarray([list(cycle[:i]).count(phase) for i in range(len(cycle))], np.int32)
    return (step // len(cycle)) * list(cycle).count(phase) + jnp.asarray(in_prefix)[step % len(cycle)]


def conv_discriminator_for(teacher: BackboneConfig, config: Any, *, rngs: nnx.Rngs) -> ConvDiscriminatorHeads:
    """One conv head per block in config.block_ids, as wide as the teacher (its config), on its token
    grid (any recipe config with block_ids: SD3.5-Flash's too)."""
    side = teacher.sample_size // teacher.patch_size
    return ConvDiscriminatorHeads(teacher.inner_dim, len(config.block_ids), (side, side), rngs=rngs)


def teacher_block_features(sprint: TrigFlowNetworks, state: DistillState, x_hat: jax.Array, t: jax.Array,
                           caption: jax.Array, caption_mask: jax.Array, block_ids: Sequence[int]) -> list[jax.Array]:
    """The frozen teacher's token features [B, N, D] of (x̂ [B, ...], t [B]) after each of block_ids,
    with captions [B, L, D] / masks [B, L]. Its parameters get no gradient; its input does (the
    generator's path to the student)."""
    x_flow, s = flow_input(x_hat, t)
    return sprint.frozen_teacher(state).block_features(x_flow, s, caption, caption_mask, block_ids=block_ids)


# Builders' pieces: a run config (s2flash_jax.config.Config) made into networks and optimizers.

def product_optimizer(config, updates: int | None = None) -> optax.GradientTransformation:
    """The optimizer of the network the run is for: train.trainable applies to it alone."""
    return optimizer_from_config(config.train, config.train.steps if updates is None else updates,
                                 config.train.trainable)


def null_caption_of(config, channels: int) -> jax.Array:
    """The unconditional caption teacher training and distillation pair: zeros [L, channels]."""
    return jnp.zeros((config.data.caption_length, channels), jnp.float32)


def student_and_teacher(config, seeds, teacher_params) -> tuple[Backbone, Backbone]:
    """config.model and config.teacher freshly initialised from seeds[0] / seeds[1], the teacher
    holding teacher_params where given."""
    if config.teacher is None:
        raise ValueError("config.teacher is not set: distillation needs the teacher's architecture")
    student = build_backbone(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    teacher = build_backbone(config.teacher, precision=config.precision, rngs=nnx.Rngs(seeds[1]))
    if teacher_params is not None:
        nnx.update(teacher, teacher_params)
    return student, teacher


def distilled_from_teacher(config, distill: DistillState) -> DistillState:
    """The student started from the teacher's weights (unless the config says not), the teacher stored
    in train.teacher_dtype."""
    if config.train.init_student_from_teacher:
        distill = distill.replace(params={**distill.params, "student": student_from_teacher(
            distill.frozen["teacher"], distill.params["student"], kind_of(config.model).zeroed_in_new_student)})
    if config.train.teacher_dtype == "bfloat16":
        distill = distill.replace(frozen={**distill.frozen, "teacher": jax.tree.map(
            lambda x: x.astype(jnp.bfloat16), distill.frozen["teacher"])})
    return distill


def student_only_builder(recipe_fn):
    """The builder of a recipe that trains the student alone (TBCM, LCM): recipe_fn(student, teacher,
    null_caption, config=its settings, optimizer=...); its settings are the Config section named as
    the recipe."""

    def build(config, seeds, teacher_params):
        student, teacher = student_and_teacher(config, seeds, teacher_params)
        recipe, distill = recipe_fn(student, teacher, null_caption_of(config, config.teacher.caption_channels),
                                    config=getattr(config, config.recipe), optimizer=product_optimizer(config))
        return recipe, distilled_from_teacher(config, distill)

    return build


def student_and_partner_optimizers(config, cycle, partners: Sequence[str] = ("discriminator",),
                                    stages=()) -> dict[str, optax.GradientTransformation]:
    """The student's optimizer and its partner networks' (a discriminator, SD3.5-Flash's fake score,
    each trained by the phase of the same name), each scheduled over its own share of the (staged)
    cycle: recipes/base.phase_count."""
    steps = config.train.steps
    return {"student": product_optimizer(config, phase_count(steps, cycle, "generator", stages)),
            **{name: optimizer_from_config(config.train, phase_count(steps, cycle, name, stages))
               for name in partners}}


def student_from_teacher(teacher: nnx.State, student: nnx.State, zeroed: Sequence[str]) -> nnx.State:
    """The student with every parameter it shares with the teacher copied (copy_shared) and those
    under the '/'-joined path prefixes `zeroed` zero (its backbone kind's zeroed_in_new_student)."""
    zeroed = tuple(zeroed)
    flat = [(path, var.replace(jnp.zeros_like(var.get_value()))
             if zeroed and "/".join(map(str, path)).startswith(zeroed) else var)
            for path, var in nnx.to_flat_state(copy_shared(teacher, student))]
    return nnx.from_flat_state(flat)


def copy_shared(source: nnx.State, target: nnx.State) -> nnx.State:
    """target with every parameter that `source` has at the same path and shape replaced by it.

    SANA-Sprint starts the student from its teacher: all shared weights are the teacher's, the
    student-only parts (guidance embedder, logvar head) keep their initialisation.
    """
    flat_source = dict(nnx.to_flat_state(source))
    flat = [(path, flat_source[path].replace(flat_source[path].get_value().astype(var.get_value().dtype))
             if path in flat_source and flat_source[path].get_value().shape == var.get_value().shape else var)
            for path, var in nnx.to_flat_state(target)]
    return nnx.from_flat_state(flat)
