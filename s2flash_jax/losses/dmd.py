"""Distribution matching (DMD / DMD2) with a fake-score network, and SD3.5-Flash's timestep sharing,
as pure functions (shared/reference/recipes.md §3).

The generator's sample x̂0 is re-noised to x_t = cos t·x̂0 + sin t·z (TrigFlow, z ~ N(0, σ_d²)); two
score networks predict x0 there, both without gradient:

  real  the frozen teacher with classifier-free guidance (guided_x0)
  fake  a trainable copy of the teacher, without guidance, that tracks the generator's own
        distribution (trained with fake_score_loss on detached generator samples)

  g        = (x̂0_fake − x̂0_real) / mean_elements|x̂0 − x̂0_real|     per example (DMD2)
  L_DM     = ½·mean((x̂0 − sg(x̂0 − g))²)                             ∂L_DM/∂x̂0 = g / x̂0.size

By Tweedie, x̂0_fake − x̂0_real = (σ_t²/α_t)·(∇log p_fake,t − ∇log p_real,t)(x_t) (α_t = cos t,
σ_t = σ_d·sin t): up to positive per-example factors, DMD's gradient of KL(p_gen,t ‖ p_real,t) with
respect to the generator's sample, so descending along g moves its distribution toward the teacher's.

Times. The DM and fake-score times are either drawn at random (DMD2: flow time s ~ U[0.02, 0.98]
for DM, the full range for the fake score) or shared with the student's own trajectory
(SD3.5-Flash's timestep sharing, our reading [interpretation], see `shared_times`).

Everything is float32; x0 / x_t are TrigFlow scale (unit latents · σ_d); x: [B, ...], t: [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.flow_matching import classifier_free_guidance, per_example, standard_normal
from s2flash_jax.flows.trigflow import SIGMA_DATA, TrigFlowFn, consistency_fn
from s2flash_jax.flows.zero_snr import trigflow_time_of_levels
from s2flash_jax.precision import at_least_fp32

# (x_t [B, ...] TrigFlow scale, t [B]) -> estimate of x0 [B, ...] (TrigFlow scale)
X0Fn = Callable[[jax.Array, jax.Array], jax.Array]
# (x̂_t = x_t/σ_d [B, ...], t [B]) -> (F unconditional, F conditional), both [B, ...]
GuidedTeacherFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

TIME_MODES = ("shared", "random")
# DMD2's DM times: min/max_step_percent 0.02 / 0.98 of the DDPM range, here as flow times.
DM_FLOW_TIME_RANGE = (0.02, 0.98)


def x0_predictor(model: TrigFlowFn, sigma_data: float = SIGMA_DATA) -> X0Fn:
    """A TrigFlow velocity model as an x0 predictor: cos t·x_t − sin t·σ_d·F(x_t/σ_d, t) (consistency_fn,
    which for a diffusion model is its one-step DDIM jump to t = 0, the posterior mean of x0)."""
    return lambda x_t, t: consistency_fn(model, x_t, t, sigma_data)


def guided_x0(teacher: GuidedTeacherFn, guidance_scale: jax.Array | float,
              sigma_data: float = SIGMA_DATA) -> X0Fn:
    """The real score: the teacher's x0 prediction with classifier-free guidance at guidance_scale
    (scalar or [B]). x0 is affine in F, so guiding F guides x0 alike."""
    return x0_predictor(lambda x_hat, t: classifier_free_guidance(*teacher(x_hat, t), guidance_scale), sigma_data)


def distribution_matching_gradient(x0_hat: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
    """g [B, ...] = (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| over each example's elements.

    The normaliser makes g scale-free (DMD2: without it high-CFG teachers diverge); it is per
    example, so every sample moves by a comparable relative amount. Where it is 0 (the sample is
    already the teacher's own x0 prediction) g is 0, as DMD2 zeroes the NaNs this would give.
    All inputs [B, ...], TrigFlow scale.
    """
    x0_hat, x0_real, x0_fake = (at_least_fp32(x) for x in (x0_hat, x0_real, x0_fake))
    axes = tuple(range(1, x0_hat.ndim))
    normaliser = per_example(jnp.mean(jnp.abs(x0_hat - x0_real), axis=axes), x0_hat)
    safe = jnp.where(normaliser > 0, normaliser, 1.0)
    return jnp.where(normaliser > 0, (x0_fake - x0_real) / safe, 0.0)


def distribution_matching_loss(x0_hat: jax.Array, gradient: jax.Array) -> jax.Array:
    """½·mean((x̂0 − sg(x̂0 − g))²): a surrogate whose gradient with respect to x̂0 is g / x̂0.size, so
    descent moves every sample along −g. Its value is ½·mean(g²), a diagnostic, not a distance.
    x0_hat, gradient: [B, ...]."""
    x0_hat = at_least_fp32(x0_hat)
    target = jax.lax.stop_gradient(x0_hat - gradient)
    return 0.5 * jnp.mean((x0_hat - target) ** 2)


def distribution_matching(x0_hat: jax.Array, x_t: jax.Array, t: jax.Array, real: X0Fn,
                          fake: X0Fn) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DM loss of generator samples x̂0 [B, ...] from their re-noised versions x_t [B, ...] at t [B].

    x_t must hold x̂0 at time t (x_t = cos t·x̂0 + sin t·z; `trigflow.noised`); which noise z is
    the caller's choice (fresh, or the student's own rollout noise under timestep sharing). real and
    fake are evaluated at (x_t, t) without gradient: neither network, nor x_t, is trained by this
    loss, only x̂0 through the surrogate. Returns (scalar loss, metrics).
    """
    x_t = jax.lax.stop_gradient(at_least_fp32(x_t))
    x0_real = jax.lax.stop_gradient(real(x_t, t))
    x0_fake = jax.lax.stop_gradient(fake(x_t, t))
    gradient = distribution_matching_gradient(jax.lax.stop_gradient(x0_hat), x0_real, x0_fake)
    loss = distribution_matching_loss(x0_hat, gradient)
    axes = tuple(range(1, gradient.ndim))
    metrics = {"dmd/loss": loss,
               "dmd/gradient_abs": jnp.mean(jnp.abs(gradient)),
               # the normaliser: how far the samples are from the teacher's x0 prediction
               "dmd/teacher_distance": jnp.mean(jnp.abs(at_least_fp32(x0_hat) - x0_real)),
               "dmd/real_fake_rms": jnp.mean(jnp.sqrt(jnp.mean((x0_fake - x0_real) ** 2, axis=axes)))}
    return loss, metrics


def fake_score_target(x0: jax.Array, z: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """F* = (dx_t/dt)/σ_d = cos t·z/σ_d − sin t·x0/σ_d for x_t = cos t·x0 + sin t·z: the TrigFlow velocity
    target. x0, z: [B, ...] TrigFlow scale (z ~ N(0, σ_d²)); t: [B]."""
    tb = per_example(at_least_fp32(t), x0)
    return (jnp.cos(tb) * z - jnp.sin(tb) * x0) / sigma_data


def fake_score_loss(fake: TrigFlowFn, x0: jax.Array, t: jax.Array, key: jax.Array,
                    sigma_data: float = SIGMA_DATA) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The fake score's denoising loss on generator samples x0 [B, ...] (TrigFlow scale) at t [B]:
    mean((F(x_t/σ_d, t) − F*)²), F* the TrigFlow velocity target (fake_score_target), z ~ N(0, σ_d²).

    F target, not x0: the fake network is a copy of the flow teacher behind the TrigFlow wrapper,
    whose F is affine in the teacher's velocity v, so this is the teacher's own flow-matching loss
    reweighted by s² + (1 − s)² ∈ [½, 1] (s the flow time). Its minimiser at each t is E[F* | x_t],
    i.e. the exact posterior x0 prediction of the generator's distribution (x0 error = sin t·σ_d·F
    error): the score DM needs. x0 is detached: the generator gets no gradient from this loss.
    Returns (scalar loss, metrics).
    """
    x0 = jax.lax.stop_gradient(at_least_fp32(x0))
    z = sigma_data * standard_normal(key, x0.shape, x0.dtype)
    tb = per_example(at_least_fp32(t), x0)
    x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
    error = at_least_fp32(fake(x_t / sigma_data, t)) - fake_score_target(x0, z, t, sigma_data)
    loss = jnp.mean(error**2)
    return loss, {"fake_score/loss": loss}


def dm_time_for_steps(schedule: Sequence[float]) -> np.ndarray:
    """[N] float32: the DM time of each student step k ∈ {0, …, N−1} under timestep sharing, for the
    student's schedule τ_0 > … > τ_N = 0 (scm_timesteps, N + 1 entries) [interpretation].

    Step k turns x_{τ_k} into x̂0, which the sampler re-noises to τ_{k+1} as the next step's input:
    the DM is evaluated there, on exactly the noise level the student's trajectory next visits.
    The final step's x̂0 is the sample itself (τ_N = 0, where both x0 predictions equal their input
    and g would vanish), so it is matched at the trajectory's last noisy time τ_{N−1}. A 1-step
    student has no intermediate time: its only DM time is τ_0, pure noise, where g matches the
    mean alone; use random times for it.
    """
    times = np.asarray(schedule, np.float32)
    if times.ndim != 1 or len(times) < 2 or times[-1] != 0 or np.any(np.diff(times) >= 0):
        raise ValueError(f"a student schedule decreases strictly to 0 with >= 2 entries, got {list(schedule)}")
    steps = len(times) - 1
    return times[np.minimum(np.arange(steps) + 1, steps - 1)]


def student_steps(key: jax.Array, schedule: Sequence[float], batch: int,
                  steps: Sequence[int] | None = None) -> jax.Array:
    """k [B] int32: per example, the student step whose x̂0 is trained, uniformly among `steps`
    (default all, 0 … N−1; a split-timestep branch trains a range of them)."""
    if steps is None:
        return jax.random.randint(key, (batch,), 0, len(schedule) - 1)
    return jnp.asarray(steps, jnp.int32)[jax.random.randint(key, (batch,), 0, len(steps))]


def shared_times(key: jax.Array, schedule: Sequence[float], batch: int,
                 steps: Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """Timestep sharing (SD3.5-Flash): (k [B] int32, t [B] float32) with k the student step
    (student_steps) and t = dm_time_for_steps(schedule)[k] its trajectory time."""
    k = student_steps(key, schedule, batch, steps)
    return k, jnp.asarray(dm_time_for_steps(schedule))[k]


def random_times(key: jax.Array, schedule: Sequence[float], batch: int,
                 flow_time_range: tuple[float, float] = DM_FLOW_TIME_RANGE,
                 steps: Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """DMD2's alternative: (k [B] int32, t [B] float32) with k the student step as in shared_times,
    but t independent of it: flow time s ~ U[flow_time_range], as TrigFlow time."""
    k_key, s_key = jax.random.split(key)
    low, high = flow_time_range
    s = jax.random.uniform(s_key, (batch,), jnp.float32, low, high)
    # x_s = (1 − s)·x0 + s·ε has the SNR of TrigFlow time arctan(s / (1 − s)).
    return student_steps(k_key, schedule, batch, steps), trigflow_time_of_levels(1.0 - s, s)


def sample_times(key: jax.Array, schedule: Sequence[float], batch: int, mode: str,
                 flow_time_range: tuple[float, float] = DM_FLOW_TIME_RANGE,
                 steps: Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """(k, t), both [B]: shared_times for mode "shared", random_times (within flow_time_range) for
    "random"; k among `steps` (default all)."""
    if mode == "shared":
        return shared_times(key, schedule, batch, steps)
    if mode == "random":
        return random_times(key, schedule, batch, flow_time_range, steps)
    raise ValueError(f"time mode {mode!r}; expected one of {TIME_MODES}")
