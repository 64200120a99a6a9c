"""The teacher's own sampling trajectories as consistency-training points (TBCM, arXiv 2511.20410).

TBCM replaces forward-noised images by the states the teacher visits while it generates: from
pure noise at t = π/2, DDIM-style TrigFlow steps along its guided velocity through a route of
decreasing times. Every state x_t on the way, with the velocity there, is an sCM training point
(the sCM loss needs only x_t, t and dx_t/dt), so no image, autoencoder or dataset is needed.

Route strategies (how the times are chosen; hustvl/TBCM trains with "stratified"):
  reference:         the teacher's shifted flow schedule (flow time s -> t = arctan(s / (1 - s)))
  stratified:        one uniform draw inside each interval of the reference route (the first two
                     merged), redrawn every step
  sorted_lognormal:  sCM's log-normal training times, sorted, after π/2
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.trigflow import MAX_TIME, SIGMA_DATA, ddim_step, lognormal_times

ROUTE_STRATEGIES = ("reference", "stratified", "sorted_lognormal")


def reference_route(num_points: int, shift: float = 1.0) -> np.ndarray:
    """TrigFlow times float32 [num_points], from MAX_TIME (π/2) down, all > 0: flow times 1, 1 - 1/K, ... 1/K,
    warped by s -> shift·s / (1 + (shift - 1)·s) as the teacher's sampler warps them, then
    t = arctan(s / (1 - s)) (σ_d cancels)."""
    if num_points < 2:
        raise ValueError(f"a route needs at least 2 points (pure noise and one more), got {num_points}")
    s = np.linspace(1.0, 0.0, num_points + 1)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    route = np.arctan2(s, 1.0 - s)
    route[0] = MAX_TIME  # where the student's sampler starts (SANA's 1.5708)
    return route.astype(np.float32)


def route_times(key: jax.Array, route: np.ndarray, strategy: str, p_mean: float = 0.2, p_std: float = 1.6,
                sigma_data: float = SIGMA_DATA) -> jax.Array:
    """This step's route [K], strictly decreasing from π/2 (shared by the batch, as TBCM's trainer does).

    route: reference_route(K, shift); p_mean / p_std: sCM's time distribution (sorted_lognormal).
    """
    route = jnp.asarray(route, jnp.float32)
    if strategy == "reference":
        return route
    if strategy == "stratified":
        # Slot i >= 2 draws inside [route[i + 1], route[i]] (route[K] = 0), slot 1 inside [route[2], π/2]
        # (as hustvl/TBCM: the student's 1-step start needs training times near π/2): the intervals do
        # not overlap, so the draws stay ordered.
        upper, lower = route[1:].at[0].set(route[0]), jnp.append(route[2:], 0.0)
        u = jax.random.uniform(key, upper.shape, jnp.float32, 0.05, 1.0)  # 0 excluded: t = 0 is the end
        return jnp.concatenate([route[:1], lower + u * (upper - lower)])
    if strategy == "sorted_lognormal":
        t = jnp.sort(lognormal_times(key, route.shape[0] - 1, p_mean, p_std, sigma_data))[::-1]
        return jnp.concatenate([jnp.full((1,), MAX_TIME), jnp.minimum(t, MAX_TIME * (1 - 1e-3))])
    raise ValueError(f"route strategy {strategy!r}; expected one of {ROUTE_STRATEGIES}")


def teacher_trajectory(velocity: Callable[[jax.Array, jax.Array], jax.Array], x_start: jax.Array,
                       times: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Integrate dx/dt = velocity(x, t) from x_start at times[0] through times to t = 0.

    Each step is the first-order TrigFlow (DDIM) update x_t' = cos(t - t')·x_t - sin(t - t')·dx/dt,
    exact when the sample's x0 and noise are fixed along the step. x_start: [B, ...] (TrigFlow
    scale, σ_d·z at π/2); times: [K] decreasing. Returns (states [K, B, ...] at times, velocities
    [K, B, ...] there, the final x0 [B, ...]).
    """
    times = jnp.asarray(times, jnp.float32)

    def step(x, t_pair):
        t, t_next = t_pair
        v = velocity(x, jnp.full((x.shape[0],), t))
        return ddim_step(x, t, t_next, v), (x, v)

    x0, (states, velocities) = jax.lax.scan(step, x_start, (times, jnp.append(times[1:], 0.0)))
    return states, velocities, x0
