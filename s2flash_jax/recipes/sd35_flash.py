"""SD3.5-Flash-style distribution-matching distillation (shared/reference/recipes.md §3): a few-step
student trained by DMD2's distribution-matching gradient against a fake-score network, with the DM
evaluated at the student's own trajectory times (timestep sharing), an optional adversary on the
student's intermediate states with periodically refreshed heads, two stages, and split-timestep
branches. Where the paper is not public (everything but the names of its parts) this is our reading,
marked [interpretation]; docs/sd35_flash.md says which choices were ours.

Trains: `student` (SANA-Sprint's: guidance embedding, logvar head (unused here), TrigFlow-wrapped;
the engine starts it as a copy of the teacher), `fake_score` (a copy of the teacher, started from
its weights, conditional only: it tracks the student's own distribution) and, with an adversary,
`discriminator` (S2-Flash's conv heads on the frozen teacher's block features). Frozen: `teacher`
and the null caption (the real score is the teacher with classifier-free guidance).
Phases: "generator" (DM loss, plus the adversarial term in stage 2, trains the student), "fake_score"
(denoising loss on detached student samples) and "discriminator" (GAN loss, stage 2 only).
Stage 1, from step 0: ("generator", "fake_score" × fake_score_updates), DMD2's two-time-scale rule,
the fake score kept close to the moving student. Stage 2, from global step adversarial_from: the
same cycle plus one "discriminator" update [interpretation: the adversary joins once distribution
matching has moved the student off the teacher; adversarial_from=0 starts there].
Batch: captions only, {"caption": [B, L, D], "caption_mask": [B, L]}: every sample is the student's;
with an adversary also "latents" [B, H, W, C] (unit scale), the real examples.

Adversary on intermediate states [interpretation]: the student's step-k output x̂0 re-noised to
τ_{k+1}, exactly the state its sampler visits next (the final sample itself after the last step),
against a real latent re-noised at the same time with the same noise, both judged through the
teacher's block features with the batch's captions. Every discriminator_refresh_every-th
discriminator update starts the heads from a fresh random initialisation and a fresh optimizer
state (the periodic refresh), so they cannot overfit to artefacts the student has left behind.

Split-timestep branches (docs/sd35_flash.md): step_range = (first, stop) trains only the
student's steps first … stop − 1 (for the student, its fake score and its adversary); `s2flash train
--fork RUN` starts such a branch from a finished run, and `s2flash merge` interpolates the branches'
weights into one student.

Times: the student's schedule is the sampler's, step_schedule(steps, shift) = τ_0 = π/2 > … > τ_N = 0.
  student input  k ~ U{0, …, N−1} per example; x_{τ_k} is the state the student's own multistep
                 sampler reaches from pure noise (backward simulation, DMD2; no gradient), so the
                 student trains on exactly the inputs it will see; x̂0 = consistency_fn at (x_{τ_k}, τ_k)
  DM / fake      "shared" (SD3.5-Flash's timestep sharing, our reading; losses/dmd.shared_times):
                 both at τ_{k+1}, where the sampler re-noises step k's x̂0 (τ_{N−1} for the last
                 step); "random" (DMD2): DM at flow time U[0.02, 0.98], the fake score at U[0, 1]
  re-noising     fresh noise, as the sampler's own re-noising, so x_t is distributed as the state
                 the sampler visits next
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.flows.trigflow import SIGMA_DATA, TrigFlowFn, noised, trigflow_from_flow_matching
from s2flash_jax.losses import ladd
from s2flash_jax.losses.adversarial import GAN_LOSSES
from s2flash_jax.losses.dmd import (
    DM_FLOW_TIME_RANGE, TIME_MODES, X0Fn, distribution_matching, fake_score_loss, guided_x0, sample_times,
    student_steps, x0_predictor)
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.models.backbone import Backbone
from s2flash_jax.models.discriminator import ConvDiscriminatorHeads
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import (
    TrigFlowNetworks, check_student_and_teacher, conv_discriminator_for, distilled_from_teacher, null_caption_of,
    phase_updates_before, reference_optimizer, require_block_features, step_schedule, student_and_partner_optimizers,
    student_and_teacher, teacher_block_features)
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry


@dataclasses.dataclass(frozen=True)
class SD35FlashConfig:
    """steps: the student's step count N (its schedule: see the module docstring).
    time_mode: "shared" (DM and fake-score times on the student's trajectory; needs steps >= 2) or
      "random" (DMD2's independent times); losses/dmd.TIME_MODES.
    guidance_scale: the real score's classifier-free guidance scale, also the student's guidance
      input (sample with the same sample.guidance_scale). One scale, as DMD2: the fake score does not
      see it, so with several it would track their mixture.
    fake_score_updates: fake-score updates per generator update (DMD2's dfake_gen_update_ratio: 5
      SDXL, 10 SD1.5).
    dm_flow_time_range / fake_score_flow_time_range: [low, high) flow times of the "random" mode
      (DMD2: 0.02–0.98 for DM, the full range for the fake score).
    adversarial_weight: the generator's weight on the intermediate-state adversarial term (0: no
      adversary, no discriminator, captions only). DMD2's is 5e-3 against its unnormalised DM loss.
    adversarial_from: global step at which stage 2 (adversary on) begins; 0: from the start. It,
      block_ids, gan_loss and discriminator_refresh_every are ignored without an adversary, so
      adversarial_weight=0 alone turns a two-stage config into distribution matching throughout.
    block_ids: teacher blocks (0-based) whose features feed one conv head each.
    gan_loss: "non_saturating" (DMD2) or "hinge"; losses/adversarial.py.
    discriminator_refresh_every: discriminator updates between fresh re-initialisations of the heads
      (0: never).
    step_range: (first, stop): train only the student's steps first … stop − 1, a split-timestep
      branch; () trains all.
    """

    steps: int = 4
    time_mode: str = "shared"
    guidance_scale: float = 4.5
    fake_score_updates: int = 5
    dm_flow_time_range: Sequence[float] = DM_FLOW_TIME_RANGE
    fake_score_flow_time_range: Sequence[float] = (0.0, 1.0)
    adversarial_weight: float = 0.0
    adversarial_from: int = 0
    block_ids: Sequence[int] = (2, 8, 14, 19)
    gan_loss: str = "non_saturating"
    discriminator_refresh_every: int = 0
    step_range: Sequence[int] = ()

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sd35_flash.steps={self.steps} must be >= 1")
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"sd35_flash.time_mode={self.time_mode!r}; expected one of {TIME_MODES}")
        if self.time_mode == "shared" and self.steps == 1:
            raise ValueError("sd35_flash.time_mode='shared' with sd35_flash.steps=1: a 1-step student's only "
                             "trajectory time is pure noise, where the DM gradient matches the mean alone; use "
                             "time_mode='random' or steps >= 2")
        if self.guidance_scale < 1:
            raise ValueError(f"sd35_flash.guidance_scale={self.guidance_scale} must be >= 1")
        if self.fake_score_updates < 1:
            raise ValueError(f"sd35_flash.fake_score_updates={self.fake_score_updates} must be >= 1")
        for key in ("dm_flow_time_range", "fake_score_flow_time_range"):
            value = tuple(getattr(self, key))
            if len(value) != 2 or not 0.0 <= value[0] < value[1] <= 1.0:
                raise ValueError(f"sd35_flash.{key}={value} must be (low, high) with 0 <= low < high <= 1")
        for key in ("adversarial_weight", "adversarial_from", "discriminator_refresh_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"sd35_flash.{key}={getattr(self, key)} must be >= 0")
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"sd35_flash.gan_loss={self.gan_loss!r}; expected one of {tuple(GAN_LOSSES)}")
        if not self.block_ids or min(self.block_ids) < 0 or len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError(f"sd35_flash.block_ids={tuple(self.block_ids)} must name at least one teacher block, "
                             "each >= 0 and none twice")
        step_range = tuple(self.step_range)
        if step_range and (len(step_range) != 2 or not 0 <= step_range[0] < step_range[1] <= self.steps):
            raise ValueError(f"sd35_flash.step_range={step_range} must be () or (first, stop) with "
                             f"0 <= first < stop <= sd35_flash.steps={self.steps}")

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    @property
    def trained_steps(self) -> tuple[int, ...]:
        """The student steps this run trains: all, or a split-timestep branch's step_range."""
        return tuple(range(*self.step_range)) if self.step_range else tuple(range(self.steps))

    @property
    def stage_two_cycle(self) -> tuple[str, ...]:
        """One generator update, fake_score_updates fake-score updates, and with an adversary one
        discriminator update."""
        return ("generator",) + ("fake_score",) * self.fake_score_updates + ("discriminator",) * self.adversarial

    @property
    def cycle(self) -> tuple[str, ...]:
        """Stage 1's cycle: stage 2's without the discriminator, unless stage 2 starts at step 0."""
        if self.adversarial and not self.adversarial_from:
            return self.stage_two_cycle
        return ("generator",) + ("fake_score",) * self.fake_score_updates

    @property
    def stages(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """recipes/base.Recipe.stages: stage 2 from adversarial_from, when it is a later stage."""
        return ((self.adversarial_from, self.stage_two_cycle),) if self.adversarial and self.adversarial_from else ()


def rollout_states(student_x0: X0Fn, noise: jax.Array, key: jax.Array, schedule: Sequence[float],
                   sigma_data: float = SIGMA_DATA) -> jax.Array:
    """[N, B, ...]: the states x_{τ_0}, …, x_{τ_{N−1}} the multistep sampler (trigflow.scm_sample)
    visits from noise [B, ...] ~ N(0, 1) with the same key: x_{τ_0} = σ_d·noise, then each step's x̂0
    re-noised to the next time with the sampler's key for that step. student_x0: (x_t, t) -> x̂0."""
    keys = jax.random.split(key, len(schedule))[:-1]
    times = jnp.asarray(schedule, jnp.float32)
    start = sigma_data * noise

    def step(x, j):
        t = jnp.full((x.shape[0],), times[j])
        x0 = student_x0(x, t)
        x_next = noised(keys[j], x0, jnp.full((x.shape[0],), times[j + 1]), sigma_data)
        return x_next, x_next

    _, later = jax.lax.scan(step, start, jnp.arange(len(schedule) - 2))
    return jnp.concatenate([start[None], later])


@dataclasses.dataclass(frozen=True)
class SD35FlashNetworks:
    """sprint: the student's and the teacher's functions (SANA-Sprint's own); fake_score: the fake
    score's graph definition (the teacher's architecture); schedule: step_schedule(config.steps, shift);
    latent_shape: [H, W, C] of the student's samples; discriminator: the heads' graph definition and
    fresh_discriminator: key -> freshly initialised head parameters (None without an adversary)."""

    sprint: TrigFlowNetworks
    fake_score: Any
    config: SD35FlashConfig
    schedule: tuple[float, ...]
    latent_shape: tuple[int, ...]
    discriminator: Any = None
    fresh_discriminator: Callable[[jax.Array], Any] | None = None

    def student_x0(self, params, batch) -> X0Fn:
        """The student's x0 prediction (consistency function) for the batch's captions, guided at
        config.guidance_scale."""
        student = self.sprint.student_fn(batch)
        w = jnp.full((batch["caption"].shape[0],), self.config.guidance_scale, jnp.float32)
        return x0_predictor(lambda x_hat, t: student(params, x_hat, t, w)[0])

    def fake_score_fn(self, params, batch) -> TrigFlowFn:
        """(x̂_t [B, ...], t [B]) -> F of the fake score with these parameters, conditional on the
        batch's captions (no guidance, DMD2)."""
        net = nnx.merge(self.fake_score, params)

        def flow(x_flow, s):
            return net(x_flow, s, batch["caption"], batch["caption_mask"])

        return trigflow_from_flow_matching(flow)

    def student_inputs(self, params, batch, k: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_{τ_k} [B, ...], τ_k [B]): per example the state the student's own sampler (parameters
        params, no gradient) reaches before step k [B]. Costs N − 1 student passes for the whole
        batch whatever k is (one scanned rollout, then a per-example pick)."""
        params = jax.lax.stop_gradient(params)
        noise_key, sampler_key = jax.random.split(key)
        noise = standard_normal(noise_key, (k.shape[0], *self.latent_shape))
        states = rollout_states(self.student_x0(params, batch), noise, sampler_key, self.schedule)
        x_k = jax.lax.stop_gradient(states[k, jnp.arange(k.shape[0])])
        return x_k, jnp.asarray(self.schedule, jnp.float32)[k]

    def student_sample(self, params, batch, k: jax.Array, key: jax.Array) -> jax.Array:
        """x̂0 [B, ...] of step k [B] of the student with params (differentiable in params, through
        that step only)."""
        x_k, tau_k = self.student_inputs(params, batch, k, key)
        return self.student_x0(params, batch)(x_k, tau_k)

    def times(self, key: jax.Array, batch_size: int, flow_time_range: Sequence[float]
              ) -> tuple[jax.Array, jax.Array]:
        """(k [B], t [B]): student steps and their DM / fake-score times (losses/dmd.sample_times)."""
        return sample_times(key, self.schedule, batch_size, self.config.time_mode, tuple(flow_time_range),
                            self.config.trained_steps)

    def intermediate_features(self, state: DistillState, batch, x0_hat: jax.Array, k: jax.Array, key: jax.Array
                              ) -> tuple[list[jax.Array], list[jax.Array]]:
        """(real, fake) teacher block features of the intermediate states: the student's step-k output
        x̂0 [B, ...] re-noised to τ_{k+1} (the state its sampler visits next) and the batch's latents
        re-noised there with the same noise, so a pair differs only in its clean latent. One teacher
        call on the doubled batch; x̂0's gradient flows through the fake half."""
        sd = SIGMA_DATA
        t_next = jnp.asarray(self.schedule, jnp.float32)[k + 1]
        x0_real = batch["latents"].astype(jnp.float32) * sd
        real = ladd.renoised_input(key, x0_real, t_next, sd)
        fake = ladd.renoised_input(key, x0_hat, t_next, sd)
        both = teacher_block_features(
            self.sprint, state, jnp.concatenate([real, fake]), jnp.concatenate([t_next, t_next]),
            jnp.concatenate([batch["caption"]] * 2), jnp.concatenate([batch["caption_mask"]] * 2),
            self.config.block_ids)
        n = x0_hat.shape[0]
        return [f[:n] for f in both], [f[n:] for f in both]

    def heads(self, params) -> ConvDiscriminatorHeads:
        return nnx.merge(self.discriminator, params)

    def in_stage_two(self, state: DistillState) -> jax.Array:
        """[] bool: whether the adversary is on at this global step."""
        return state.step >= self.config.adversarial_from

    def discriminator_restart(self, state: DistillState, key: jax.Array) -> tuple[jax.Array, Any]:
        """Phase.restart: due on every discriminator_refresh_every-th discriminator update (counted
        from the start of stage 2, never the first), with fresh random heads."""
        cfg = self.config
        updates = phase_updates_before(state.step - cfg.adversarial_from, cfg.stage_two_cycle, "discriminator")
        due = (updates > 0) & (updates % max(cfg.discriminator_refresh_every, 1) == 0)
        return due & (cfg.discriminator_refresh_every > 0), self.fresh_discriminator(key)

    @property
    def phases(self) -> dict[str, Phase]:
        phases = {"generator": Phase("generator", "student", self.generator_loss),
                  "fake_score": Phase("fake_score", "fake_score", self.fake_score_loss)}
        if self.config.adversarial:
            restart = self.discriminator_restart if self.config.discriminator_refresh_every else None
            phases["discriminator"] = Phase("discriminator", "discriminator", self.discriminator_loss, restart)
        return phases

    def generator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        time_key, sample_key, noise_key, adversarial_key = jax.random.split(key, 4)
        k, t = self.times(time_key, batch["caption"].shape[0], cfg.dm_flow_time_range)
        x0_hat = self.student_sample(params, batch, k, sample_key)
        real = guided_x0(self.sprint.teacher_fn(state, batch), cfg.guidance_scale)
        fake = x0_predictor(self.fake_score_fn(jax.lax.stop_gradient(state.params["fake_score"]), batch))
        loss, metrics = distribution_matching(x0_hat, noised(noise_key, x0_hat, t), t, real, fake)
        metrics = {**metrics, "sd35_flash/dm_time": jnp.mean(t)}
        if cfg.adversarial:
            heads = self.heads(jax.lax.stop_gradient(state.params["discriminator"]))

            def adversarial(x0):
                _, fake_features = self.intermediate_features(state, batch, x0, k, adversarial_key)
                return GAN_LOSSES[cfg.gan_loss].generator(heads(fake_features))

            # Stage 1 skips the teacher's feature pass rather than multiplying it by zero.
            stage_two = self.in_stage_two(state)
            term = jax.lax.cond(stage_two, adversarial, lambda x0: jnp.float32(0.0), x0_hat)
            loss = loss + cfg.adversarial_weight * term
            metrics = {**metrics, "generator/adversarial": term,
                       "sd35_flash/stage": 1.0 + stage_two.astype(jnp.float32)}
        return loss, (metrics, {})

    def discriminator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        time_key, sample_key, noise_key = jax.random.split(key, 3)
        k = student_steps(time_key, self.schedule, batch["caption"].shape[0], cfg.trained_steps)
        x0_hat = jax.lax.stop_gradient(self.student_sample(state.params["student"], batch, k, sample_key))
        real_features, fake_features = jax.lax.stop_gradient(
            self.intermediate_features(state, batch, x0_hat, k, noise_key))
        heads = self.heads(params)
        real_logits, fake_logits = heads(real_features), heads(fake_features)
        loss = GAN_LOSSES[cfg.gan_loss].discriminator(real_logits, fake_logits)
        return loss, ({"discriminator/accuracy": ladd.discriminator_accuracy(real_logits, fake_logits),
                       "discriminator/real_logit": jnp.mean(real_logits),
                       "discriminator/fake_logit": jnp.mean(fake_logits)}, {})

    def fake_score_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        time_key, sample_key, noise_key = jax.random.split(key, 3)
        k, t = self.times(time_key, batch["caption"].shape[0], cfg.fake_score_flow_time_range)
        x0_hat = jax.lax.stop_gradient(self.student_sample(state.params["student"], batch, k, sample_key))
        loss, metrics = fake_score_loss(self.fake_score_fn(params, batch), x0_hat, t, noise_key)
        return loss, ({**metrics, "sd35_flash/fake_score_time": jnp.mean(t)}, {})


def sd35_flash(student: Backbone, teacher: Backbone, null_caption: jax.Array,
               config: SD35FlashConfig = SD35FlashConfig(), *, shift: float = 1.0,
               discriminator: ConvDiscriminatorHeads | None = None,
               optimizers: dict[str, optax.GradientTransformation] | None = None) -> tuple[Recipe, DistillState]:
    """The SD3.5-Flash recipe over these networks, and its initial state; the fake score starts as a
    copy of the teacher's weights.

    null_caption: [L, caption_channels], the teacher's unconditional caption, paired with each
    prompt's own mask; shift: the sampler's flow shift (sample.flow_shift), which places the step
    set; discriminator: the heads (conv_discriminator_for(teacher.config, config)), required exactly when
    config.adversarial_weight > 0; optimizers default to SANA-Sprint's CAME for every network.
    """
    problems = check_student_and_teacher(student, teacher, SCMConfig(), null_caption)
    if config.adversarial:
        if discriminator is None:
            problems.append("sd35_flash.adversarial_weight > 0 needs discriminator heads")
        elif len(discriminator.heads) != len(config.block_ids):
            problems.append(f"the discriminator has {len(discriminator.heads)} heads for "
                            f"{len(config.block_ids)} sd35_flash.block_ids")
        if max(config.block_ids) >= teacher.config.num_layers:
            problems.append(f"sd35_flash.block_ids {list(config.block_ids)} must name teacher blocks in "
                            f"[0, {teacher.config.num_layers})")
    elif discriminator is not None:
        problems.append("discriminator heads given but sd35_flash.adversarial_weight is 0")
    if problems:
        raise ValueError("SD3.5-Flash networks do not fit together: " + "; ".join(problems))
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    tc = teacher.config
    params = {"student": s_params, "fake_score": jax.tree.map(jnp.copy, t_params)}
    d_graph = fresh = None
    if discriminator is not None:
        d_graph, params["discriminator"] = nnx.split(discriminator, nnx.Param)

        teacher_config = teacher.config  # not the module: a closure over it would keep its weights alive

        def fresh(key):
            return nnx.split(conv_discriminator_for(teacher_config, config, rngs=nnx.Rngs(key)), nnx.Param)[1]

    nets = SD35FlashNetworks(TrigFlowNetworks(s_graph, t_graph), t_graph, config,
                             step_schedule(config.steps, shift), (tc.sample_size, tc.sample_size, tc.in_channels),
                             d_graph, fresh)
    recipe = Recipe(name="sd35_flash", trains=tuple(params), frozen=("teacher", "null_caption"),
                    phases=nets.phases, cycle=config.cycle, stages=config.stages, product="student",
                    needs_latents=config.adversarial,
                    optimizers=optimizers or {name: reference_optimizer() for name in params})
    state = recipe.init_state(
        params=params,
        frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption), "null_caption_mask": None})
    return recipe, state


def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """The step set is placed by sample.flow_shift, as S2-Flash's; the fake score starts as the teacher."""
    cfg = config.sd35_flash
    if cfg.adversarial:
        require_block_features(config.teacher, "SD3.5-Flash's stage-2 adversary", "set "
                               "sd35_flash.adversarial_weight=0 to train by distribution matching alone")
    student, teacher = student_and_teacher(config, seeds, teacher_params)
    heads = conv_discriminator_for(teacher.config, cfg, rngs=nnx.Rngs(seeds[2])) if cfg.adversarial else None
    partners = ("fake_score", "discriminator") if cfg.adversarial else ("fake_score",)
    recipe, distill = sd35_flash(student, teacher, null_caption_of(config, config.teacher.caption_channels),
                                 config=cfg, shift=config.sample.flow_shift, discriminator=heads,
                                 optimizers=student_and_partner_optimizers(config, cfg.cycle, partners, cfg.stages))
    return recipe, distilled_from_teacher(config, distill)


# step_range: a fork's share of the student's timesteps (split-timestep fine-tuning, docs/sd35_flash.md).
# The demo trains on images: its stage-2 adversary judges the student's intermediate states against real ones.
ENTRY = RecipeEntry("sd35_flash", SD35FlashConfig, build, teacher="frozen",
                    summary="SD3.5-Flash: distribution matching against a fake score, 4 steps",
                    forkable=("step_range",),
                    demo=DemoEntry("sd35-flash", "sd35", "student-sd35-flash", "SD3.5-Flash student", (4,)))
