"""TrigFlow (SANA-Sprint / sCM): x_t = cos(t)·x0 + sin(t)·z, t in [0, π/2], z ~ N(0, σ_d²).

Networks are called on unit-variance inputs x_t/σ_d and predict F with dx_t/dt = σ_d·F. A
rectified-flow teacher becomes a TrigFlow model without training (`trigflow_from_flow_matching`);
the consistency function of a TrigFlow model is one DDIM step to t = 0 (`consistency_fn`).
Shapes: x: [B, ...]; t: [B].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.flow_matching import per_example, standard_normal
from s2flash_jax.precision import at_least_fp32

MAX_TIME = 1.57080  # π/2 as SANA-Sprint and diffusers' SCMScheduler write it
SIGMA_DATA = 0.5

FlowVelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_flow [B, ...], s [B]) -> v
TrigFlowFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t/σ_d [B, ...], t [B]) -> F


def flow_time(t: jax.Array) -> jax.Array:
    """TrigFlow time t -> rectified-flow time s = sin t / (sin t + cos t); 0 -> 0, π/4 -> 1/2, π/2 -> 1."""
    t = at_least_fp32(t)
    return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


def flow_input(x_hat: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The flow-matching state and time that hold the same data and noise as TrigFlow (x̂_t, t).

    x_flow = x̂·√(s² + (1-s)²) = (1-s)·x̂0 + s·ε with s = flow_time(t). x_hat: [B, ...]; t: [B].
    """
    s = flow_time(t)
    return at_least_fp32(x_hat) * _flow_norm(s, x_hat), s


def _flow_norm(s, like):
    sb = per_example(s, like)
    return jnp.sqrt(sb**2 + (1 - sb) ** 2)


def trigflow_from_flow_matching(flow_velocity: FlowVelocityFn, *, has_aux: bool = False) -> TrigFlowFn:
    """Wrap a flow-matching velocity net (x_s = (1-s)·x0 + s·ε, v = ε - x0) as a TrigFlow F.

    Exact, no training: run the net on `flow_input(x̂, t)` and map its velocity to
    F = [(1-2s)·x_flow + (1-2s+2s²)·v] / √(s² + (1-s)²) = -sin t·x̂0 + cos t·ε.
    All scalings in float32; `flow_velocity` decides its own compute dtype. With has_aux the net
    returns (v, aux) and the wrapper (F, aux), e.g. the student's logvar.
    """

    def trigflow(x_hat: jax.Array, t: jax.Array):
        x_flow, s = flow_input(x_hat, t)
        out = flow_velocity(x_flow, s)
        v, aux = out if has_aux else (out, None)
        sb, norm = per_example(s, x_hat), _flow_norm(s, x_hat)
        f = ((1 - 2 * sb) * x_flow + (1 - 2 * sb + 2 * sb**2) * v.astype(x_flow.dtype)) / norm
        return (f, aux) if has_aux else f

    return trigflow


def lognormal_times(key: jax.Array, batch: int, p_mean: float, p_std: float,
                    sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Training times [B]: t = arctan(exp(p_mean + p_std·n) / σ_d), n ~ N(0, 1).

    σ_d·tan t (the noise-to-signal ratio) is log-normal; SANA-Sprint calls this
    `logit_normal_trigflow` and uses (0.2, 1.6) for the student and (-0.6, 1.0) for the discriminator.
    """
    n = jax.random.normal(key, (batch,), jnp.float32)
    return jnp.arctan(jnp.exp(p_mean + p_std * n) / sigma_data)


def noised(key: jax.Array, x0: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """x_t = cos t·x0 + sin t·z with fresh z ~ N(0, σ_d²) drawn from `key`. x0: [B, ...]; t: [B]."""
    tb = per_example(at_least_fp32(t), x0)
    return jnp.cos(tb) * x0 + jnp.sin(tb) * sigma_data * standard_normal(key, x0.shape, x0.dtype)


def consistency_fn(model: TrigFlowFn, x_t: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t): the student's estimate of x0."""
    tb = per_example(at_least_fp32(t), x_t)
    return jnp.cos(tb) * x_t - jnp.sin(tb) * sigma_data * model(x_t / sigma_data, t)


def ddim_step(x_t: jax.Array, t: jax.Array, t_next: jax.Array, dxt_dt: jax.Array) -> jax.Array:
    """x at t_next from x_t at t along dx/dt = dxt_dt: cos(t − t')·x_t − sin(t − t')·dx_t/dt, exact
    when the sample's x0 and noise stay fixed over the step (the TrigFlow form of a DDIM / flow Euler
    step). x_t, dxt_dt: [B, ...]; t, t_next: [B] or scalars."""
    delta = per_example(jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32), x_t)
    return jnp.cos(delta) * x_t - jnp.sin(delta) * dxt_dt


def scm_timesteps(num_steps: int, intermediate: Sequence[float] | None = None,
                  max_time: float = MAX_TIME, shift: float = 1.0) -> list[float]:
    """Sampling times [max_time, ..., 0] with num_steps + 1 entries.

    Without `intermediate`, uniform in t (diffusers' SCMScheduler), then moved towards noise by
    `shift` as a flow teacher's schedule is (noise-to-signal ratio tan t times shift, the flow-time
    warp s -> shift·s / (1 + (shift-1)·s)), so a student samples where its teacher was trained;
    shift 1 keeps diffusers' times. With `intermediate`, the num_steps - 1 times between max_time
    and 0 (SANA's own 2-step validation uses (1.0,), diffusers' pipeline (1.3,)).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    if intermediate is None:
        uniform = [max_time - i * max_time / num_steps for i in range(1, num_steps)]
        return [max_time, *(math.atan(shift * math.tan(t)) for t in uniform), 0.0]
    intermediate = [float(x) for x in intermediate]
    if len(intermediate) != num_steps - 1:
        raise ValueError(f"{num_steps} steps need {num_steps - 1} intermediate times, got {intermediate}")
    times = [max_time, *intermediate, 0.0]
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"sampling times must decrease strictly from {max_time} to 0, got {times}")
    return times


def scm_sample(model: TrigFlowFn, noise: jax.Array, key: jax.Array, times: Sequence[float],
               sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Multistep consistency sampling: denoise to x0, re-noise with fresh noise to the next time.

    noise: [B, ...] ~ N(0, 1) (scaled by σ_d here); times: [max_time, ..., 0]; returns the final x0
    estimate (TrigFlow data scale). The steps are one scanned body, so any step count compiles
    the model once.
    """
    keys = jax.random.split(key, len(times))[:-1]
    # The re-noising coefficients in float64 on the host, then float32: as Python floats would give.
    t_next = np.asarray(times[1:], np.float64)
    renoise = (np.cos(t_next).astype(np.float32), (np.sin(t_next) * sigma_data).astype(np.float32))

    def step(x, inputs):
        t, key, cos_next, sin_next = inputs
        x0 = consistency_fn(model, x, jnp.full((x.shape[0],), t), sigma_data)
        # At the last time (0) this is x0 itself: cos 0 = 1, sin 0 = 0.
        return cos_next * x0 + sin_next * standard_normal(key, x.shape, x.dtype), None

    x0, _ = jax.lax.scan(step, noise * sigma_data, (np.asarray(times[:-1], np.float32), keys, *renoise))
    return x0
