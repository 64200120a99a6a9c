"""SANA-Sprint: sCM + LADD distillation of a flow-matching SANA teacher into a 1–4 step student.

Trains: `student` (SANA with guidance embedding and logvar head, TrigFlow-wrapped) and
`discriminator` (heads on teacher block features). Frozen: `teacher` (flow SANA, TrigFlow-wrapped)
and `null_caption` / `null_caption_mask` (the teacher's unconditional caption for CFG).
Phases: "generator" (sCM + adversarial, trains the student) and "discriminator" (hinge loss,
trains the heads and advances their spectral-norm vectors), alternating one each by default.

Batch: {"latents": [B, H, W, C] unit-scale latents (VAE latents · scaling factor),
        "caption": [B, L, caption_channels], "caption_mask": [B, L]}.

Where the NVlabs/Sana training script and the diffusers port differ, this follows NVlabs: real and
fake discriminator times are independent, the max-time sample uses t = π/2, logvar comes from the
flow-time embedding, and the warm-up step counts both phases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.trigflow import consistency_fn, flow_input, noised
from s2flash_jax.losses import ladd
from s2flash_jax.losses.scm import SCMConfig, sample_guidance_scales, scm_loss
from s2flash_jax.models.backbone import Backbone
from s2flash_jax.models.discriminator import DiscriminatorHeads
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import (
    TrigFlowNetworks, check_student_and_teacher, distilled_from_teacher, null_caption_of, reference_optimizer,
    require_block_features, student_and_partner_optimizers, student_and_teacher)
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry


@dataclasses.dataclass(frozen=True)
class SanaSprintConfig:
    """cycle: ("generator", "discriminator") alternates the student's sCM + LADD update with the
    discriminator's (SANA-Sprint); ("generator",) trains sCM alone, with no discriminator (a
    backbone without block features, or an ablation)."""

    scm: SCMConfig = SCMConfig()
    ladd: ladd.LADDConfig = ladd.LADDConfig()
    scm_weight: float = 1.0
    cycle: Sequence[str] = ("generator", "discriminator")

    @property
    def adversarial(self) -> bool:
        return "discriminator" in self.cycle


def discriminator_for(teacher: Backbone, config: SanaSprintConfig, *, rngs: nnx.Rngs) -> DiscriminatorHeads:
    """One head per teacher block in config.ladd.block_ids, as wide as the teacher."""
    return DiscriminatorHeads(teacher.config.inner_dim, len(config.ladd.block_ids), rngs=rngs)


@dataclasses.dataclass(frozen=True)
class SprintNetworks(TrigFlowNetworks):
    """The student and teacher (TrigFlowNetworks) plus the LADD discriminator's graph and the settings."""

    discriminator: Any
    config: SanaSprintConfig

    def discriminator_logits(self, state: DistillState, params, stats, x_hat, t, caption, caption_mask, *,
                             update_stats: bool):
        """Heads on frozen-teacher features of (x̂, t). Returns (logits [B, K·N], new spectral-norm stats).

        The teacher's parameters get no gradient, but its input does: the generator's adversarial
        gradient flows through the teacher into the student's sample.
        """
        teacher = self.frozen_teacher(state)
        x_flow, s = flow_input(x_hat, t)
        features = teacher.block_features(x_flow, s, caption, caption_mask,
                                          block_ids=self.config.ladd.block_ids)
        heads = nnx.merge(self.discriminator, params, stats, copy=True)
        logits = heads(features, update_stats=update_stats)
        return logits, nnx.state(heads, nnx.BatchStat)

    def student_sample(self, student, params, x0, guidance_scale, key):
        """The student's one-step x0 estimate from a re-noised batch at generator_times (TrigFlow scale)."""
        cfg = self.config
        t_key, z_key = jax.random.split(key)
        t = ladd.generator_times(t_key, x0.shape[0], cfg.scm.p_mean, cfg.scm.p_std, cfg.ladd, cfg.scm.sigma_data)
        x_t = noised(z_key, x0, t, cfg.scm.sigma_data)
        return consistency_fn(lambda x, s: student(params, x, s, guidance_scale)[0], x_t, t, cfg.scm.sigma_data)

    def generator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        x0 = batch["latents"].astype(jnp.float32) * cfg.scm.sigma_data
        w_key, scm_key, sample_key, t_key, z_key = jax.random.split(key, 5)
        w = sample_guidance_scales(w_key, x0.shape[0], cfg.scm)
        student = self.student_fn(batch)
        scm, metrics = scm_loss(student, params, self.teacher_fn(state, batch), x0, w, scm_key, state.step,
                                cfg.scm)
        if self.discriminator is None:
            return cfg.scm_weight * scm, (metrics, {})
        fake = self.student_sample(student, params, x0, w, sample_key)
        t_d = ladd.discriminator_times(t_key, x0.shape[0], cfg.ladd, cfg.scm.sigma_data)
        logits, _ = self.discriminator_logits(
            state, state.params["discriminator"], state.stats["discriminator"],
            ladd.renoised_input(z_key, fake, t_d, cfg.scm.sigma_data), t_d, batch["caption"], batch["caption_mask"],
            update_stats=False)
        adversarial = ladd.hinge_generator_loss(logits)
        loss = cfg.scm_weight * scm + cfg.ladd.adversarial_weight * adversarial
        return loss, ({**metrics, "generator/adversarial": adversarial}, {})

    def discriminator_loss(self, params, state: DistillState, batch, key):
        cfg, sd = self.config, self.config.scm.sigma_data
        x0 = batch["latents"].astype(jnp.float32) * sd
        caption, mask = batch["caption"], batch["caption_mask"]
        batch_size = x0.shape[0]
        w_key, sample_key, tf_key, tr_key, zf_key, zr_key = jax.random.split(key, 6)
        w = sample_guidance_scales(w_key, batch_size, cfg.scm)
        fake = jax.lax.stop_gradient(self.student_sample(
            self.student_fn(batch), jax.lax.stop_gradient(state.params["student"]), x0, w, sample_key))
        if cfg.ladd.misaligned_pairs:
            fake = jnp.concatenate([fake, ladd.misaligned(x0)])
            caption, mask = jnp.concatenate([caption, caption]), jnp.concatenate([mask, mask])
        t_fake = ladd.discriminator_times(tf_key, fake.shape[0], cfg.ladd, sd)
        t_real = (ladd.discriminator_times(tr_key, batch_size, cfg.ladd, sd) if cfg.ladd.independent_real_times
                  else t_fake[:batch_size])
        fake_logits, stats = self.discriminator_logits(
            state, params, state.stats["discriminator"], ladd.renoised_input(zf_key, fake, t_fake, sd), t_fake,
            caption, mask, update_stats=True)
        real_logits, stats = self.discriminator_logits(
            state, params, stats, ladd.renoised_input(zr_key, x0, t_real, sd), t_real,
            batch["caption"], batch["caption_mask"], update_stats=True)
        loss = ladd.hinge_discriminator_loss(real_logits, fake_logits)
        metrics = {"discriminator/accuracy": ladd.discriminator_accuracy(real_logits, fake_logits),
                   "discriminator/real_logit": jnp.mean(real_logits),
                   "discriminator/fake_logit": jnp.mean(fake_logits)}
        return loss, (metrics, {"discriminator": jax.lax.stop_gradient(stats)})


def sana_sprint(student: Backbone, teacher: Backbone, discriminator: DiscriminatorHeads | None,
                null_caption: jax.Array, null_caption_mask: jax.Array | None = None,
                config: SanaSprintConfig = SanaSprintConfig(),
                optimizers: dict[str, optax.GradientTransformation] | None = None) -> tuple[Recipe, DistillState]:
    """The SANA-Sprint recipe over these networks, and its initial state.

    null_caption: [L, caption_channels], the teacher's unconditional caption (SANA's learned
    y_embedding, or the text encoder's empty-prompt embedding); L must be the batches' caption
    length. null_caption_mask: [L], or None to use each prompt's own mask as NVlabs does.
    discriminator: the LADD heads, exactly when config.cycle has a discriminator phase (None: sCM
    alone). optimizers default to `reference_optimizer()` for each trained network.
    """
    _check_networks(student, teacher, discriminator, null_caption, config)
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    params, stats = {"student": s_params}, {}
    d_graph = None
    if discriminator is not None:
        d_graph, params["discriminator"], stats["discriminator"] = nnx.split(discriminator, nnx.Param, nnx.BatchStat)
    nets = SprintNetworks(s_graph, t_graph, d_graph, config)
    phases = {"generator": Phase("generator", "student", nets.generator_loss)}
    if discriminator is not None:
        phases["discriminator"] = Phase("discriminator", "discriminator", nets.discriminator_loss)
    recipe = Recipe(
        name="sana_sprint", trains=tuple(params), frozen=("teacher", "null_caption"), phases=phases,
        cycle=tuple(config.cycle), optimizers=optimizers or {name: reference_optimizer() for name in params},
        product="student")
    state = recipe.init_state(
        params=params,
        frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption),
                "null_caption_mask": None if null_caption_mask is None else jnp.asarray(null_caption_mask)},
        stats=stats)
    return recipe, state


def _check_networks(student, teacher, discriminator, null_caption, config: SanaSprintConfig):
    problems = check_student_and_teacher(student, teacher, config.scm, null_caption)
    if (discriminator is not None) != config.adversarial:
        problems.append(f"cycle {list(config.cycle)} {'has' if config.adversarial else 'has no'} discriminator phase "
                        f"but {'no' if discriminator is None else 'a'} discriminator was given")
    ids = list(config.ladd.block_ids)
    if discriminator is not None and (max(ids) >= teacher.config.num_layers or min(ids) < 0):
        problems.append(f"ladd.block_ids {ids} must name teacher blocks in [0, {teacher.config.num_layers})")
    if discriminator is not None and len(discriminator.heads) != len(ids):
        problems.append(f"the discriminator has {len(discriminator.heads)} heads for {len(ids)} block_ids")
    if problems:
        raise ValueError("SANA-Sprint networks do not fit together: " + "; ".join(problems))


def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """LADD's heads where the cycle has a discriminator phase; a teacher without block features
    (its backbone kind lacks them) is refused for it."""
    cfg = config.sana_sprint
    if cfg.adversarial:
        require_block_features(config.teacher, "SANA-Sprint's LADD", "set sana_sprint.cycle=generator to distil "
                                                                     "with sCM alone")
    student, teacher = student_and_teacher(config, seeds, teacher_params)
    heads = discriminator_for(teacher, cfg, rngs=nnx.Rngs(seeds[2])) if cfg.adversarial else None
    recipe, distill = sana_sprint(student, teacher, heads, null_caption_of(config, config.teacher.caption_channels),
                                  config=cfg, optimizers=student_and_partner_optimizers(
                                      config, cfg.cycle, ("discriminator",) if cfg.adversarial else ()))
    return recipe, distilled_from_teacher(config, distill)


ENTRY = RecipeEntry("sana_sprint", SanaSprintConfig, build, teacher="frozen",
                    summary="SANA-Sprint: sCM consistency + LADD on the teacher's features",
                    demo=DemoEntry("sana-sprint", "", "student", "student"))
