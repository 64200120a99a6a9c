"""SD3.5-Flash-style distribution-matching distillation (shared/reference/recipes.md §3): a few-step
student trained by DMD2's distribution-matching gradient against a fake-score network, with the DM
evaluated at the student's own trajectory times (timestep sharing). No GAN term yet.

Trains: `student` (SANA-Sprint's: guidance embedding, logvar head (unused here), TrigFlow-wrapped;
the engine starts it as a copy of the teacher) and `fake_score` (a copy of the teacher, started from
its weights, conditional only: it tracks the student's own distribution). Frozen: `teacher` and the
null caption (the real score is the teacher with classifier-free guidance).
Phases: "generator" (DM loss, trains the student) and "fake_score" (denoising loss on detached
student samples, trains the fake score), in the cycle ("generator", "fake_score" × fake_score_updates):
DMD2's two-time-scale rule, the fake score kept close to the moving student.
Batch: captions only, {"caption": [B, L, D], "caption_mask": [B, L]}: every sample is the student's.

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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.flows.trigflow import SIGMA_DATA, TrigFlowFn, noised, trigflow_from_flow_matching
from s2flash_jax.losses.dmd import (
    DM_FLOW_TIME_RANGE, TIME_MODES, X0Fn, distribution_matching, fake_score_loss, guided_x0, sample_times,
    x0_predictor)
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.s2flash import step_schedule
from s2flash_jax.recipes.sana_sprint import (
    SanaSprintConfig, SprintNetworks, check_student_and_teacher, reference_optimizer)


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
    """

    steps: int = 4
    time_mode: str = "shared"
    guidance_scale: float = 4.5
    fake_score_updates: int = 5
    dm_flow_time_range: Sequence[float] = DM_FLOW_TIME_RANGE
    fake_score_flow_time_range: Sequence[float] = (0.0, 1.0)

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

    @property
    def cycle(self) -> tuple[str, ...]:
        """One generator update, then fake_score_updates fake-score updates."""
        return ("generator",) + ("fake_score",) * self.fake_score_updates


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
    latent_shape: [H, W, C] of the student's samples."""

    sprint: SprintNetworks
    fake_score: Any
    config: SD35FlashConfig
    schedule: tuple[float, ...]
    latent_shape: tuple[int, ...]

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
        return sample_times(key, self.schedule, batch_size, self.config.time_mode, tuple(flow_time_range))

    @property
    def phases(self) -> dict[str, Phase]:
        return {"generator": Phase("generator", "student", self.generator_loss),
                "fake_score": Phase("fake_score", "fake_score", self.fake_score_loss)}

    def generator_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        time_key, sample_key, noise_key = jax.random.split(key, 3)
        k, t = self.times(time_key, batch["caption"].shape[0], cfg.dm_flow_time_range)
        x0_hat = self.student_sample(params, batch, k, sample_key)
        real = guided_x0(self.sprint.teacher_fn(state, batch), cfg.guidance_scale)
        fake = x0_predictor(self.fake_score_fn(jax.lax.stop_gradient(state.params["fake_score"]), batch))
        loss, metrics = distribution_matching(x0_hat, noised(noise_key, x0_hat, t), t, real, fake)
        return loss, ({**metrics, "sd35_flash/dm_time": jnp.mean(t)}, {})

    def fake_score_loss(self, params, state: DistillState, batch, key):
        cfg = self.config
        time_key, sample_key, noise_key = jax.random.split(key, 3)
        k, t = self.times(time_key, batch["caption"].shape[0], cfg.fake_score_flow_time_range)
        x0_hat = jax.lax.stop_gradient(self.student_sample(state.params["student"], batch, k, sample_key))
        loss, metrics = fake_score_loss(self.fake_score_fn(params, batch), x0_hat, t, noise_key)
        return loss, ({**metrics, "sd35_flash/fake_score_time": jnp.mean(t)}, {})


def sd35_flash(student: SanaTransformer, teacher: SanaTransformer, null_caption: jax.Array,
               config: SD35FlashConfig = SD35FlashConfig(), *, shift: float = 1.0,
               optimizers: dict[str, optax.GradientTransformation] | None = None) -> tuple[Recipe, DistillState]:
    """The SD3.5-Flash recipe over these networks, and its initial state; the fake score starts as a
    copy of the teacher's weights.

    null_caption: [L, caption_channels], the teacher's unconditional caption, paired with each
    prompt's own mask; shift: the sampler's flow shift (sample.flow_shift), which places the step
    set; optimizers default to SANA-Sprint's CAME for both networks.
    """
    problems = check_student_and_teacher(student, teacher, SCMConfig(), null_caption)
    if problems:
        raise ValueError("SD3.5-Flash networks do not fit together: " + "; ".join(problems))
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    tc = teacher.config
    nets = SD35FlashNetworks(SprintNetworks(s_graph, t_graph, None, SanaSprintConfig()), t_graph, config,
                             step_schedule(config.steps, shift), (tc.sample_size, tc.sample_size, tc.in_channels))
    recipe = Recipe(name="sd35_flash", trains=("student", "fake_score"), frozen=("teacher", "null_caption"),
                    phases=nets.phases, cycle=config.cycle, product="student", needs_latents=False,
                    optimizers=optimizers or {"student": reference_optimizer(), "fake_score": reference_optimizer()})
    state = recipe.init_state(
        params={"student": s_params, "fake_score": jax.tree.map(jnp.copy, t_params)},
        frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption), "null_caption_mask": None})
    return recipe, state
