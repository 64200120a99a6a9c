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

from s2flash_jax.flows.trigflow import SIGMA_DATA, consistency_fn, flow_input, noised, trigflow_from_flow_matching
from s2flash_jax.losses import ladd
from s2flash_jax.losses.scm import SCMConfig, sample_guidance_scales, scm_loss
from s2flash_jax.models.discriminator import DiscriminatorHeads
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.flow_matching import null_caption_batch
from s2flash_jax.train.optim import optimizer


@dataclasses.dataclass(frozen=True)
class SanaSprintConfig:
    scm: SCMConfig = SCMConfig()
    ladd: ladd.LADDConfig = ladd.LADDConfig()
    scm_weight: float = 1.0
    cycle: Sequence[str] = ("generator", "discriminator")


def reference_optimizer(learning_rate: float | optax.Schedule = 2e-6, clip_norm: float = 0.1,
                        max_consecutive_skips: int = 100) -> optax.GradientTransformation:
    """The SANA-Sprint yamls' optimizer for both networks: CAME (0.9, 0.999, 0.9999), eps (1e-30, 1e-16),
    no weight decay, after global-norm clipping at 0.1.

    Like NVlabs, an update whose gradient is not finite is skipped (parameters and moments unchanged)
    and counted in the state's `total_notfinite`.
    """
    return optimizer("came", learning_rate, clip_norm=clip_norm, max_consecutive_skips=max_consecutive_skips)


def discriminator_for(teacher: SanaTransformer, config: SanaSprintConfig, *, rngs: nnx.Rngs) -> DiscriminatorHeads:
    """One head per teacher block in config.ladd.block_ids, as wide as the teacher."""
    return DiscriminatorHeads(teacher.config.inner_dim, len(config.ladd.block_ids), rngs=rngs)


@dataclasses.dataclass(frozen=True)
class SprintNetworks:
    """Graph definitions (static) that turn parameter pytrees back into callable models (the student
    and the teacher are shared with TBCM, which has no discriminator)."""

    student: Any
    teacher: Any
    discriminator: Any
    config: SanaSprintConfig

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

    def frozen_teacher(self, state: DistillState) -> SanaTransformer:
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


def sana_sprint(student: SanaTransformer, teacher: SanaTransformer, discriminator: DiscriminatorHeads,
                null_caption: jax.Array, null_caption_mask: jax.Array | None = None,
                config: SanaSprintConfig = SanaSprintConfig(),
                optimizers: dict[str, optax.GradientTransformation] | None = None) -> tuple[Recipe, DistillState]:
    """The SANA-Sprint recipe over these networks, and its initial state.

    null_caption: [L, caption_channels], the teacher's unconditional caption (SANA's learned
    y_embedding, or the text encoder's empty-prompt embedding); L must be the batches' caption
    length. null_caption_mask: [L], or None to use each prompt's own mask as NVlabs does.
    optimizers default to `reference_optimizer()` for both networks.
    """
    _check_networks(student, teacher, discriminator, null_caption, config)
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    d_graph, d_params, d_stats = nnx.split(discriminator, nnx.Param, nnx.BatchStat)
    nets = SprintNetworks(s_graph, t_graph, d_graph, config)
    optimizers = optimizers or {"student": reference_optimizer(), "discriminator": reference_optimizer()}
    recipe = Recipe(
        name="sana_sprint", trains=("student", "discriminator"), frozen=("teacher", "null_caption"),
        phases={"generator": Phase("generator", "student", nets.generator_loss),
                "discriminator": Phase("discriminator", "discriminator", nets.discriminator_loss)},
        cycle=tuple(config.cycle), optimizers=optimizers, product="student")
    state = recipe.init_state(
        params={"student": s_params, "discriminator": d_params},
        frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption),
                "null_caption_mask": None if null_caption_mask is None else jnp.asarray(null_caption_mask)},
        stats={"discriminator": d_stats})
    return recipe, state


def check_student_and_teacher(student: SanaTransformer, teacher: SanaTransformer, scm: SCMConfig,
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
        problems.append(f"the teacher's time embedder is fed {t.flow_time_scale:g}·s (timestep_scale={t.timestep_scale}) "
                        f"but the student's {s.flow_time_scale:g}·s: a SANA-Sprint student uses the dense time "
                        "embedding (s itself); convert the teacher with `s2flash prepare-teacher`")
    if s.qk_norm != t.qk_norm:
        problems.append(f"the student has qk_norm={s.qk_norm!r} but the teacher {t.qk_norm!r}: a student copied from "
                        "it would start with untrained norms; add them to the teacher with `s2flash prepare-teacher`")
    if s.inner_dim != t.inner_dim or s.in_channels != t.in_channels:
        problems.append(f"student and teacher differ in width or latent channels "
                        f"({s.inner_dim}/{s.in_channels} vs {t.inner_dim}/{t.in_channels})")
    if scm.sigma_data != SIGMA_DATA:
        problems.append(f"sigma_data={scm.sigma_data}: the TrigFlow wrapper of a flow teacher assumes {SIGMA_DATA}")
    return problems


def _check_networks(student, teacher, discriminator, null_caption, config: SanaSprintConfig):
    problems = check_student_and_teacher(student, teacher, config.scm, null_caption)
    ids = list(config.ladd.block_ids)
    if max(ids) >= teacher.config.num_layers or min(ids) < 0:
        problems.append(f"ladd.block_ids {ids} must name teacher blocks in [0, {teacher.config.num_layers})")
    if len(discriminator.heads) != len(ids):
        problems.append(f"the discriminator has {len(discriminator.heads)} heads for {len(ids)} block_ids")
    if problems:
        raise ValueError("SANA-Sprint networks do not fit together: " + "; ".join(problems))
