"""S2-Flash-style adversarial distillation (shared/reference/recipes.md §4): a 1–8 step student on a
fixed trailing step set, trained against a multi-timestep latent discriminator that shares the frozen
teacher's backbone, with DMD2's conv heads, lazy R1, an optional sCM term and an unconditional stage.

Trains: `student` (SANA-Sprint's: guidance embedding, logvar head, TrigFlow-wrapped; the engine
starts it as a copy of the teacher) and `discriminator` (ConvDiscriminatorHeads: one 4x4-conv /
GroupNorm / SiLU head per tapped teacher block, logits averaged). Frozen: `teacher` and the null
caption. Phases: "generator" (adversarial + distillation, trains the student) and "discriminator"
(GAN loss + lazy R1, trains the heads), alternating one each by default.
Batch: as SANA-Sprint's, {"latents": [B, H, W, C] unit scale, "caption": [B, L, D], "caption_mask": [B, L]}.

Times. Every time comes from the sampler's own schedule, scm_timesteps(steps, shift) with the run's
sample.flow_shift, so training and `few_step_sample(steps=N)` meet at the same float32 times:
  schedule        τ_0 = π/2 > τ_1 > … > τ_{N−1} > τ_N = 0
  student input   k ~ U{0, …, N−1} per example; x_{τ_k} is the real latent forward-noised to τ_k,
                  and at k = 0 pure noise σ_d·z, what the sampler starts from (§4.3: TrigFlow at π/2
                  is already zero terminal SNR); x̂0 = consistency_fn(student, x_{τ_k}, τ_k), at
                  k = 0 a direct x0 prediction from noise (§4.4)
  discriminator   real x0 and x̂0 re-noised at one t_D ~ U{τ_1, …, τ_N} with one noise draw per
                  pair (§4.7): the times the sampler hands an x̂0 on at (τ_N = 0: the final sample).
                  Not τ_0: there real and fake re-noised with the same noise are the same input, and
                  a 1-step student would have no other time.
  distillation    the sCM loss (losses/scm.consistency_loss) along the teacher's guided velocity at
                  t ~ U{τ_1, …, τ_{N−1}}; not at τ_0, where its weight 1/tan t vanishes (as TBCM's
                  pure-noise point), so a 1-step student is purely adversarial.

Unconditional stage (our reading of SDXL-Lightning's, recipes.md §4.1): from global step
`unconditional_after` the teacher computes the discriminator's features of real and fake alike, in
both phases, with the null caption (the teacher's unconditional caption, each prompt's mask). The
discriminator then judges whether a latent looks real, not whether it fits its caption, which stops
rewarding the few modes a conditional judge prefers and so relaxes mode coverage. SDXL-Lightning
switches its trainable encoder-copy discriminator to unconditional; here the backbone is the frozen
teacher, so only its caption changes and the heads keep training.

R1 (losses/r1.py) penalises the heads' gradient with respect to their inputs, the real examples'
block features (as SANA-Sprint would place it: a gradient through the teacher would cost a second
backward pass of the backbone), on every `r1_every`-th discriminator update with γ·r1_every (lazy
R1, StyleGAN2), counted from the global step and the cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import classifier_free_guidance, per_example
from s2flash_jax.flows.trigflow import consistency_fn, noised
from s2flash_jax.losses import ladd
from s2flash_jax.losses.adversarial import GAN_LOSSES
from s2flash_jax.losses.r1 import r1_penalty
from s2flash_jax.losses.scm import SCMConfig, consistency_loss, sample_guidance_scales
from s2flash_jax.models.backbone import Backbone
from s2flash_jax.models.discriminator import ConvDiscriminatorHeads
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import (
    TrigFlowNetworks, check_student_and_teacher, conv_discriminator_for, distilled_from_teacher, null_caption_batch,
    null_caption_of, phase_updates_before, reference_optimizer, require_block_features, step_schedule,
    student_and_partner_optimizers, student_and_teacher, teacher_block_features)
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry

STEP_COUNTS = (1, 2, 4, 5, 8)


@dataclasses.dataclass(frozen=True)
class S2FlashConfig:
    """steps: the student's step count N, one of STEP_COUNTS (its schedule: see the module docstring).
    block_ids: teacher blocks (0-based) whose token features feed one conv head each (SANA-Sprint's
      LADD blocks of the 1.6B / 600M teachers by default).
    loss: "non_saturating" (softplus, DMD2 and SDXL-Lightning) or "hinge" (LADD); losses/adversarial.py.
    adversarial_weight: the generator's weight on the adversarial term (SANA-Sprint's adv λ).
    distillation_weight: the generator's weight on the sCM term (0: purely adversarial, the term's
      teacher and JVP passes are then not run); must be 0 for steps=1, whose only time is pure noise.
    r1_gamma: γ of the R1 penalty γ/2·E‖∇ D‖² on the real features (0: none); 1e-5 is the scale ADD
      and SANA-Sprint use for latent / feature inputs (recipes.md §4.2 suggests sweeping it x10).
    r1_every: lazy R1 interval, in discriminator updates (StyleGAN2's 16).
    unconditional_after: global step from which the discriminator's features use the null caption
      (0: never).
    scm: the student's guidance scales (also the teacher's CFG scale of the sCM term), the sCM
      tangent warm-up and normalisation; its p_mean / p_std are not used (times come from the steps).
    cycle: phase names repeated forever, as SANA-Sprint's.
    """

    steps: int = 8
    block_ids: Sequence[int] = (2, 8, 14, 19)
    loss: str = "non_saturating"
    adversarial_weight: float = 0.5
    distillation_weight: float = 1.0
    r1_gamma: float = 1e-5
    r1_every: int = 16
    unconditional_after: int = 0
    scm: SCMConfig = SCMConfig()
    cycle: Sequence[str] = ("generator", "discriminator")

    def __post_init__(self):
        if self.steps not in STEP_COUNTS:
            raise ValueError(f"s2flash.steps={self.steps}; expected one of {STEP_COUNTS}")
        if not self.block_ids or min(self.block_ids) < 0 or len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError(f"s2flash.block_ids={tuple(self.block_ids)} must name at least one teacher block, "
                             "each >= 0 and none twice")
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"s2flash.loss={self.loss!r}; expected one of {tuple(GAN_LOSSES)}")
        for key in ("adversarial_weight", "distillation_weight", "r1_gamma", "unconditional_after"):
            if getattr(self, key) < 0:
                raise ValueError(f"s2flash.{key}={getattr(self, key)} must be >= 0")
        if self.r1_every < 1:
            raise ValueError(f"s2flash.r1_every={self.r1_every} must be >= 1")
        if not self.cycle or set(self.cycle) - {"generator", "discriminator"}:
            raise ValueError(f"s2flash.cycle={tuple(self.cycle)} must name phases among 'generator' and "
                             "'discriminator'")
        if self.steps == 1 and self.distillation_weight:
            raise ValueError(f"s2flash.distillation_weight={self.distillation_weight} with s2flash.steps=1: a "
                             "1-step student's only time is pure noise, where the sCM loss has no weight; set "
                             "distillation_weight=0 (purely adversarial) or steps >= 2")
        if not (self.adversarial_weight or self.distillation_weight):
            raise ValueError("s2flash.adversarial_weight and s2flash.distillation_weight are both 0: nothing "
                             "would train the student")


def uniform_times(key: jax.Array, times: Sequence[float], batch: int) -> tuple[jax.Array, jax.Array]:
    """(index [B] int32, times[index] [B] float32): one of `times` per example, uniformly."""
    index = jax.random.randint(key, (batch,), 0, len(times))
    return index, jnp.asarray(times, jnp.float32)[index]


@dataclasses.dataclass(frozen=True)
class S2FlashNetworks:
    """sprint: the student's and the teacher's functions (SANA-Sprint's own); discriminator: the heads'
    graph definition; schedule: step_schedule(config.steps, shift)."""

    sprint: TrigFlowNetworks
    discriminator: Any
    config: S2FlashConfig
    schedule: tuple[float, ...]

    @property
    def sigma_data(self) -> float:
        return self.config.scm.sigma_data

    def student_inputs(self, key: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x_{τ_k} [B, ...], τ_k [B], k [B]) for clean latents x0 [B, ...] (TrigFlow scale)."""
        k_key, z_key = jax.random.split(key)
        k, t = uniform_times(k_key, self.schedule[:-1], x0.shape[0])
        # MAX_TIME is π/2 rounded as SANA-Sprint writes it, so cos τ_0 = −3.7e-6 would leak the data
        # into the pure-noise input; the sampler starts from noise alone, and so does step 0 here.
        signal = jnp.where(per_example(k > 0, x0), x0, 0.0)
        return noised(z_key, signal, t, self.sigma_data), t, k

    def renoised_pair(self, student, params, x0: jax.Array, key: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(real, fake, t_D, w): network inputs x/σ_d [B, ...] of the clean latents x0 and of the
        student's x̂0 from their noised versions, re-noised at one t_D [B] and with one noise draw per
        pair; w [B]: the guidance scale the student was given. student: TrigFlowNetworks.student_fn's."""
        sd, batch = self.sigma_data, x0.shape[0]
        w_key, input_key, t_key, z_key = jax.random.split(key, 4)
        w = sample_guidance_scales(w_key, batch, self.config.scm)
        x_t, t, _ = self.student_inputs(input_key, x0)
        fake = consistency_fn(lambda x, s: student(params, x, s, w)[0], x_t, t, sd)
        _, t_d = uniform_times(t_key, self.schedule[1:], batch)
        # The same key, so the same noise: a pair then differs only in its clean latent (recipes.md §4.7).
        return ladd.renoised_input(z_key, x0, t_d, sd), ladd.renoised_input(z_key, fake, t_d, sd), t_d, w

    def discriminator_captions(self, state: DistillState, batch) -> tuple[jax.Array, jax.Array]:
        """The captions [B, L, D] and masks [B, L] the discriminator's features are computed with: the
        batch's, or the null caption from global step config.unconditional_after on."""
        caption, mask = batch["caption"], batch["caption_mask"]
        if not self.config.unconditional_after:
            return caption, mask
        null, null_mask = null_caption_batch(caption, mask, state.frozen["null_caption"],
                                             state.frozen["null_caption_mask"])
        late = state.step >= self.config.unconditional_after
        return jnp.where(late, null, caption), jnp.where(late, null_mask, mask)

    def block_features(self, state: DistillState, x_hat: jax.Array, t: jax.Array, caption: jax.Array,
                       caption_mask: jax.Array) -> list[jax.Array]:
        return teacher_block_features(self.sprint, state, x_hat, t, caption, caption_mask, self.config.block_ids)

    def heads(self, params) -> Callable[[Sequence[jax.Array]], jax.Array]:
        """features (one [B, N, D] per block) -> logits [B] of the heads with these parameters."""
        return nnx.merge(self.discriminator, params)

    def discriminator_features(self, state: DistillState, batch, key: jax.Array
                               ) -> tuple[list[jax.Array], list[jax.Array]]:
        """(real, fake) block features of this update's pairs (renoised_pair), without gradient: one
        teacher call on the doubled batch."""
        x0 = batch["latents"].astype(jnp.float32) * self.sigma_data
        real, fake, t_d, _ = jax.lax.stop_gradient(self.renoised_pair(
            self.sprint.student_fn(batch), state.params["student"], x0, key))
        caption, mask = self.discriminator_captions(state, batch)
        both = self.block_features(state, jnp.concatenate([real, fake]), jnp.concatenate([t_d, t_d]),
                                   jnp.concatenate([caption, caption]), jnp.concatenate([mask, mask]))
        batch_size = x0.shape[0]
        return [f[:batch_size] for f in both], [f[batch_size:] for f in both]

    def distillation_loss(self, student, params, state: DistillState, batch, x0: jax.Array, w: jax.Array,
                          key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The sCM loss at one of τ_1 … τ_{N−1} per example, along the teacher's velocity guided at w."""
        sd = self.sigma_data
        t_key, z_key = jax.random.split(key)
        _, t = uniform_times(t_key, self.schedule[1:-1], x0.shape[0])
        x_t = noised(z_key, x0, t, sd)
        uncond, cond = self.sprint.teacher_fn(state, batch)(x_t / sd, t)
        velocity = sd * classifier_free_guidance(uncond, cond, w)
        return consistency_loss(student, params, x_t, t, velocity, w, state.step, self.config.scm)

    def r1_due(self, step: jax.Array) -> jax.Array:
        """Whether the discriminator update at global `step` is one of every r1_every-th (the first is)."""
        return phase_updates_before(step, self.config.cycle, "discriminator") % self.config.r1_every == 0

    def unconditional(self, state: DistillState) -> jax.Array:
        """[] float32: 1 once the unconditional stage has begun, else 0 (a metric)."""
        after = self.config.unconditional_after
        return jnp.float32(0.0) if not after else (state.step >= after).astype(jnp.float32)

    @property
    def phases(self) -> dict[str, Phase]:
        """The generator phase trains the student, the discriminator phase the heads."""
        return {"generator": Phase("generator", "student", self.generator_loss),
                "discriminator": Phase("discriminator", "discriminator", self.discriminator_loss)}

    def generator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        x0 = batch["latents"].astype(jnp.float32) * self.sigma_data
        pair_key, distill_key = jax.random.split(key)
        student = self.sprint.student_fn(batch)
        _, fake, t_d, w = self.renoised_pair(student, params, x0, pair_key)
        logits = self.heads(state.params["discriminator"])(
            self.block_features(state, fake, t_d, *self.discriminator_captions(state, batch)))
        adversarial = GAN_LOSSES[cfg.loss].generator(logits)
        loss = cfg.adversarial_weight * adversarial
        metrics = {"generator/adversarial": adversarial, "generator/fake_logit": jnp.mean(logits),
                   "s2flash/unconditional": self.unconditional(state)}
        if cfg.distillation_weight:
            distillation, scm_metrics = self.distillation_loss(student, params, state, batch, x0, w, distill_key)
            loss = loss + cfg.distillation_weight * distillation
            metrics = {**metrics, **scm_metrics}
        return loss, (metrics, {})

    def discriminator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        real_features, fake_features = self.discriminator_features(state, batch, key)
        heads = self.heads(params)
        real_logits, fake_logits = heads(real_features), heads(fake_features)
        loss = GAN_LOSSES[cfg.loss].discriminator(real_logits, fake_logits)
        r1, due = jnp.float32(0.0), jnp.bool_(False)
        if cfg.r1_gamma:
            due = self.r1_due(state.step)
            r1 = jax.lax.cond(due, lambda f: r1_penalty(heads, f, cfg.r1_gamma * cfg.r1_every),
                              lambda f: jnp.float32(0.0), real_features)
        metrics = {"discriminator/accuracy": ladd.discriminator_accuracy(real_logits, fake_logits),
                   "discriminator/real_logit": jnp.mean(real_logits),
                   "discriminator/fake_logit": jnp.mean(fake_logits),
                   # the penalty this update applied (γ·r1_every scale, 0 between R1 updates): its mean
                   # over a logging interval is the amortised γ/2·E‖∇D‖²
                   "discriminator/r1": r1, "discriminator/r1_applied": due.astype(jnp.float32),
                   "s2flash/unconditional": self.unconditional(state)}
        return loss + r1, (metrics, {})


def s2flash(student: Backbone, teacher: Backbone, discriminator: ConvDiscriminatorHeads,
            null_caption: jax.Array, config: S2FlashConfig = S2FlashConfig(), *, shift: float = 1.0,
            optimizers: dict[str, optax.GradientTransformation] | None = None) -> tuple[Recipe, DistillState]:
    """The S2-Flash recipe over these networks, and its initial state.

    null_caption: [L, caption_channels], the teacher's unconditional caption, paired with each
    prompt's own mask; shift: the sampler's flow shift (sample.flow_shift), which places the step
    set; optimizers default to SANA-Sprint's CAME for both networks.
    """
    problems = check_student_and_teacher(student, teacher, config.scm)
    ids = list(config.block_ids)
    if max(ids) >= teacher.config.num_layers:
        problems.append(f"s2flash.block_ids {ids} must name teacher blocks in [0, {teacher.config.num_layers})")
    if len(discriminator.heads) != len(ids):
        problems.append(f"the discriminator has {len(discriminator.heads)} heads for {len(ids)} s2flash.block_ids")
    if problems:
        raise ValueError("S2-Flash networks do not fit together: " + "; ".join(problems))
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    d_graph, d_params = nnx.split(discriminator, nnx.Param)
    nets = S2FlashNetworks(TrigFlowNetworks(s_graph, t_graph), d_graph,
                           config, step_schedule(config.steps, shift))
    recipe = Recipe(name="s2flash", trains=("student", "discriminator"), frozen=("teacher", "null_caption"),
                    phases=nets.phases, cycle=tuple(config.cycle), product="student",
                    optimizers=optimizers or {"student": reference_optimizer(), "discriminator": reference_optimizer()})
    state = recipe.init_state(
        params={"student": s_params, "discriminator": d_params},
        frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption), "null_caption_mask": None})
    return recipe, state


def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """The step set is placed by sample.flow_shift, so the student trains at the times it is sampled at."""
    require_block_features(config.teacher, "S2-Flash's discriminator", "distil with sana_sprint "
                                                                        "(sana_sprint.cycle=generator) instead")
    student, teacher = student_and_teacher(config, seeds, teacher_params)
    heads = conv_discriminator_for(teacher.config, config.s2flash, rngs=nnx.Rngs(seeds[2]))
    recipe, distill = s2flash(student, teacher, heads, null_caption_of(config, config.teacher.caption_channels),
                              config=config.s2flash, shift=config.sample.flow_shift,
                              optimizers=student_and_partner_optimizers(config, config.s2flash.cycle))
    return recipe, distilled_from_teacher(config, distill)


ENTRY = RecipeEntry("s2flash", S2FlashConfig, build, teacher="frozen",
                    summary="S2-Flash: consistency + conv heads on the teacher's blocks, R1, up to 8 steps",
                    demo=DemoEntry("s2flash", "s2flash", "student-s2flash", "S2-Flash student", (1, 5, 8)))
