"""TwinFlow's any-step flow (arXiv 2512.05150; inclusionAI/TwinFlow), in the rectified-flow convention.

x_s = s·z + (1 − s)·x for flow time s in [0, 1] (s = 1 is noise), as flows/flow_matching.py. An
any-step network predicts the average velocity F(x_s, s, r) of the jump from s to a target time
r ≤ s: x_r = x_s − (s − r)·F. At r = s it is the instantaneous velocity, i.e. a flow-matching
model; at r = 0 it is a one-step generator. Negative times are the twin branch: F(x, −s, −s) is
the velocity field of the model's own samples, and only |s| enters the reconstructions below.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from s2flash_jax.flows.flow_matching import per_example, standard_normal

# (x_s [B, ...], s [B], r [B]) -> F [B, ...], times signed
AnyStepFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
FIRST_TIME = 0.999  # the released sampler's first time: one NFE at s = 1 − 0.001 (its gap g0)


def data_and_noise(x_s: jax.Array, s: jax.Array, velocity: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x̂, ẑ): the data and noise endpoints of the straight line through x_s with this velocity,
    x̂ = x_s − |s|·F, ẑ = x_s + (1 − |s|)·F. x_s, velocity: [B, ...]; s: [B]."""
    s = per_example(jnp.abs(s), x_s)
    return x_s - s * velocity, x_s + (1.0 - s) * velocity


def sampling_times(steps: int, last_time: float = 0.5, shift: float = 1.0) -> jax.Array:
    """steps + 1 flow times from FIRST_TIME down to 0 for the any-step sampler.

    The released UCGM sampler's grid: u uniform on [0.001, 1 − last_time] (its gaps (0.001, g1);
    one step is a single time 0.999, the README's 2 NFE use last_time 0.6 and 4 NFE 0.5), s = 1 − u,
    then warped like the flow schedule, s' = shift·s / (1 + (shift − 1)·s), which spends the steps
    nearer noise for a teacher trained there; then a final 0.
    """
    if steps < 1 or not 0.0 < last_time < FIRST_TIME:
        raise ValueError(f"steps={steps} must be >= 1 and last_time={last_time} in (0, {FIRST_TIME})")
    s = jnp.linspace(FIRST_TIME, last_time, steps) if steps > 1 else jnp.array([FIRST_TIME])
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return jnp.concatenate([s, jnp.zeros((1,))])


def any_step_sample(fn: AnyStepFn, noise: jax.Array, key: jax.Array, times: jax.Array,
                    renoise: float = 1.0) -> jax.Array:
    """Few-step sampling: at each time jump straight to the data (target time 0), then re-noise the
    estimate to the next time, x' = (1 − s')·x̂ + s'·(√(1 − renoise)·ẑ + √renoise·ε). renoise 1 draws
    fresh noise (consistency-model style, the released default); 0 keeps the model's own ẑ.
    noise: [B, ...] at times[0]; times: [n + 1] ending at 0 -> x̂ [B, ...]."""
    b = noise.shape[0]

    def step(x, i):
        s = jnp.full((b,), times[i])
        x_hat, z_hat = data_and_noise(x, s, fn(x, s, jnp.zeros_like(s)))
        eps = standard_normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        z = jnp.sqrt(1.0 - renoise) * z_hat + jnp.sqrt(renoise) * eps
        return (1.0 - times[i + 1]) * x_hat + times[i + 1] * z, None

    x, _ = jax.lax.scan(step, noise, jnp.arange(times.shape[0] - 1))
    return x
