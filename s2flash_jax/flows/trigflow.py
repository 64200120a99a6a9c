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

from s2flash_jax.flows.flow_matching import per_example

MAX_TIME = 1.57080  # π/2 as SANA-Sprint and diffusers' SCMScheduler write it
SIGMA_DATA = 0.5

FlowVelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_flow [B, ...], s [B]) -> v
TrigFlowFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t/σ_d [B, ...], t [B]) -> F


def flow_time(t: jax.Array) -> jax.Array:
    """TrigFlow time t -> rectified-flow time s = sin t / (sin t + cos t); 0 -> 0, π/4 -> 1/2, π/2 -> 1."""
    t = t.astype(jnp.float32)
    return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


def trigflow_from_flow_matching(flow_velocity: FlowVelocityFn) -> TrigFlowFn:
    """Wrap a flow-matching velocity net (x_s = (1-s)·x0 + s·ε, v = ε - x0) as a TrigFlow F.

    Exact, no training: x_flow = x̂·√(s² + (1-s)²) is the flow state with the same data and noise,
    and F = [(1-2s)·x_flow + (1-2s+2s²)·v] / √(s² + (1-s)²) = -sin t·x̂0 + cos t·ε.
    All scalings in float32; `flow_velocity` decides its own compute dtype.
    """

    def trigflow(x_hat: jax.Array, t: jax.Array) -> jax.Array:
        s = flow_time(t)
        sb = per_example(s, x_hat)
        norm = jnp.sqrt(sb**2 + (1 - sb) ** 2)
        x_flow = x_hat.astype(jnp.float32) * norm
        v = flow_velocity(x_flow, s).astype(jnp.float32)
        return ((1 - 2 * sb) * x_flow + (1 - 2 * sb + 2 * sb**2) * v) / norm

    return trigflow


def consistency_fn(model: TrigFlowFn, x_t: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t): the student's estimate of x0."""
    tb = per_example(t.astype(jnp.float32), x_t)
    return jnp.cos(tb) * x_t - jnp.sin(tb) * sigma_data * model(x_t / sigma_data, t)


def scm_timesteps(num_steps: int, intermediate: Sequence[float] | None = None,
                  max_time: float = MAX_TIME) -> list[float]:
    """Sampling times [max_time, ..., 0] with num_steps + 1 entries.

    Without `intermediate`, uniform in t (diffusers' SCMScheduler); with it, the num_steps - 1
    times between max_time and 0 (SANA's own 2-step validation uses (1.0,), diffusers' pipeline (1.3,)).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if intermediate is None:
        return [max_time - i * max_time / num_steps for i in range(num_steps)] + [0.0]
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

    noise: [B, ...] ~ N(0, 1) (scaled by σ_d here); returns the final x0 estimate (TrigFlow data scale).
    """
    x = noise * sigma_data
    keys = jax.random.split(key, len(times))
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        x0 = consistency_fn(model, x, jnp.full((x.shape[0],), t, jnp.float32), sigma_data)
        if t_next > 0:
            fresh = jax.random.normal(keys[i], x.shape, x.dtype)
            x = math.cos(t_next) * x0 + math.sin(t_next) * sigma_data * fresh
    return x0
