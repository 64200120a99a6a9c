"""The continuous-time consistency (sCM) loss of SANA-Sprint, as a pure function.

The student's consistency function f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t) should be
constant along the teacher's probability-flow ODE. sCM trains F towards F⁻ + g where g is the
(normalised, warmed-up) direction cos t·df/dt measured with one forward-mode derivative of the
student along the teacher's guided velocity. Follows NVlabs/Sana train_scripts/train_scm_ladd.py:

  t       = arctan(exp(P_mean + P_std·n)/σ_d)            x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d²)
  dx_t/dt = σ_d·CFG(F_teacher, w)                         w ~ U{guidance_scales} per example
  F_grad  = cos t sin t·dF/dt along (dx_t/dt/σ_d, 1)     (jax.jvp, no gradient)
  g       = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t sin t·x_t + σ_d·F_grad),  r = min(1, step/warmup)
  g      ← g / (‖g‖ + c)                                  per example, over all latent elements
  loss    = mean[(1/(σ_d tan t))·e^(−logvar)·(F − F⁻ − g)² + logvar]

F⁻ = stop_gradient(F); the teacher and the JVP pass carry no gradient, so θ is trained only
through the second student forward and its logvar head. Everything here is float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from s2flash_jax.flows.flow_matching import classifier_free_guidance, per_example
from s2flash_jax.flows.trigflow import SIGMA_DATA, lognormal_times, noised
from s2flash_jax.precision import at_least_fp32

# (params, x_hat [B, ...], t [B], guidance_scale [B]) -> (F [B, ...], logvar [B])
StudentFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (x_hat [B, ...], t [B]) -> (F unconditional, F conditional), both [B, ...]
TeacherFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class SCMConfig:
    """sCM hyperparameters; defaults are the SANA-Sprint 0.6B/1.6B yamls."""

    p_mean: float = 0.2
    p_std: float = 1.6
    guidance_scales: Sequence[float] = (4.0, 4.5, 5.0)
    tangent_warmup_steps: int = 4000
    tangent_norm_constant: float = 0.1
    sigma_data: float = SIGMA_DATA

    def __post_init__(self):
        if not self.guidance_scales:
            raise ValueError("guidance_scales must name at least one scale (use (1.0,) for no guidance)")
        if self.tangent_warmup_steps < 0 or self.tangent_norm_constant <= 0 or self.sigma_data <= 0:
            raise ValueError(f"invalid sCM config {self}: warm-up must be >= 0, norm constant and sigma_data > 0")


def ode_time_derivative(fn: Callable[[jax.Array, jax.Array], jax.Array], x_hat: jax.Array, t: jax.Array,
                        dx_hat_dt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(F, cos t sin t·dF/dt) for F = fn(x̂, t) moving along dx̂/dt = dx_hat_dt, by one jax.jvp.

    The cos t sin t factor is folded into the tangents, as the reference does, so the JVP stays
    bounded near t = π/2. x_hat, dx_hat_dt: [B, ...]; t: [B].
    """
    t = at_least_fp32(t)
    cos_sin = jnp.cos(t) * jnp.sin(t)
    return jax.jvp(fn, (x_hat, t), (per_example(cos_sin, x_hat) * dx_hat_dt, cos_sin))


def tangent_warmup(step: jax.Array | int, warmup_steps: int) -> jax.Array:
    """r = min(1, step / warmup_steps): how much of the student's own time derivative enters g."""
    if warmup_steps == 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def sample_guidance_scales(key: jax.Array, batch: int, config: SCMConfig) -> jax.Array:
    """One classifier-free guidance scale per example [B], uniform over config.guidance_scales."""
    return jax.random.choice(key, jnp.asarray(config.guidance_scales, jnp.float32), (batch,))


def scm_loss(student: StudentFn, params: Any, teacher: TeacherFn, x0: jax.Array, guidance_scale: jax.Array,
             key: jax.Array, step: jax.Array | int,
             config: SCMConfig = SCMConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sCM loss of `student` at `params` on forward-noised data, differentiable in params only.

    x0: [B, ...] clean latents in TrigFlow scale (unit latents · σ_d); guidance_scale: [B] the CFG
    scale of the teacher's velocity, also fed to the student (see sample_guidance_scales);
    step: the global step for the tangent warm-up. Returns (scalar loss, metrics).
    """
    sd = config.sigma_data
    x0 = at_least_fp32(x0)
    t_key, z_key = jax.random.split(key)
    t = lognormal_times(t_key, x0.shape[0], config.p_mean, config.p_std, sd)
    x_t = noised(z_key, x0, t, sd)
    uncond, cond = teacher(x_t / sd, t)
    dxt_dt = sd * at_least_fp32(classifier_free_guidance(uncond, cond, guidance_scale))
    return consistency_loss(student, params, x_t, t, dxt_dt, guidance_scale, step, config)


def consistency_loss(student: StudentFn, params: Any, x_t: jax.Array, t: jax.Array, dxt_dt: jax.Array,
                     guidance_scale: jax.Array, step: jax.Array | int,
                     config: SCMConfig = SCMConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sCM loss at given points of the teacher's flow, differentiable in params only.

    x_t: [B, ...] TrigFlow-scale states at times t [B] in (0, π/2); dxt_dt: [B, ...] the teacher's
    guided velocity there (σ_d·CFG(F)); from forward-noised data (`scm_loss`) or from the teacher's
    own sampling trajectories (TBCM). Returns (scalar loss, metrics).
    """
    sd = config.sigma_data
    x_t, dxt_dt = at_least_fp32(x_t), jax.lax.stop_gradient(at_least_fp32(dxt_dt))
    w = guidance_scale
    x_hat = x_t / sd

    frozen = jax.lax.stop_gradient(params)
    _, f_grad = ode_time_derivative(lambda x, s: student(frozen, x, s, w)[0], x_hat, t, dxt_dt / sd)
    f_grad = jax.lax.stop_gradient(f_grad)

    f_theta, logvar = student(params, x_hat, t, w)
    f_minus = jax.lax.stop_gradient(f_theta)

    cos, sin = jnp.cos(per_example(t, x_t)), jnp.sin(per_example(t, x_t))
    r = tangent_warmup(step, config.tangent_warmup_steps)
    g = -cos**2 * (sd * f_minus - dxt_dt) - r * (cos * sin * x_t + sd * f_grad)
    g_norm = jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim))))
    g = g / per_example(g_norm + config.tangent_norm_constant, g)

    weight = per_example(1.0 / (sd * jnp.tan(t)), g)
    residual = (f_theta - f_minus - g) ** 2
    lv = per_example(logvar.astype(jnp.float32), g)
    loss = jnp.mean(weight * jnp.exp(-lv) * residual + lv)
    metrics = {
        "scm/loss": loss,
        "scm/loss_no_logvar": jnp.mean(weight * residual),
        "scm/tangent_norm": jnp.mean(g_norm),
        "scm/logvar": jnp.mean(logvar),
        "scm/tangent_warmup": r,
    }
    return loss, metrics
