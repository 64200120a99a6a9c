"""Latent consistency distillation (LCM, LCM-LoRA) in TrigFlow: sCM's discrete-time ancestor.

LCM makes the student's x0 estimate agree across one step of the guided teacher's ODE solver, on a
fixed grid of solver times (diffusers' train_lcm_distill_lora_*: 50 DDIM steps of a 1000-step
schedule; shared/reference/recipes.md §4.6):

  grid      π/2 = t_0 > t_1 > … > t_N = 0             the teacher's shifted flow schedule (solver_grid)
  interval  n ~ U{0, …, N−1} per example               t = t_n, t' = t_{n+1}
  x_t       = cos t·x0 + sin t·z                       real latents forward-noised (x_{t_0} is pure noise)
  x_t'      = ddim_step(x_t, t, t', σ_d·CFG(F_teacher, w))   one guided teacher step, no gradient
  loss      = mean(√((f_θ(x_t, t) − sg f_θ(x_t', t'))² + c²) − c)   pseudo-Huber, c = 1e-3

f is the TrigFlow consistency function cos t·x − sin t·σ_d·F, which is x itself at t = 0 exactly:
LCM's c_skip / c_out with timestep scaling 10 only approximate that boundary condition for an
ε-prediction UNet. The target is the same network under stop_gradient, as the LoRA script does (its
full-model script keeps an EMA target instead). Not taken: LCM's guidance "w" convention (effective
scale 1 + w) — scales here are diffusers' guidance_scale, as everywhere else in this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.trajectories import reference_route
from s2flash_jax.flows.trigflow import MAX_TIME
from s2flash_jax.losses.scm import SCMConfig

# (params, x_t [B, ...], t [B]) -> the x0 estimate f(x_t, t) [B, ...], TrigFlow scale
ConsistencyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LCMConfig:
    """solver_steps: N, the grid's intervals (diffusers: 50); solver_shift: the flow shift that places
    the grid (the teacher's sampling shift, so each interval is one of its own sampler's steps);
    huber_c: the pseudo-Huber constant (0: plain squared error); scm: the teacher's guidance scales
    (sampled per example, also fed to the student) and σ_d; its time and tangent settings are unused."""

    solver_steps: int = 50
    solver_shift: float = 3.0
    huber_c: float = 1e-3
    scm: SCMConfig = SCMConfig()

    def __post_init__(self):
        if self.solver_steps < 1:
            raise ValueError(f"lcm.solver_steps={self.solver_steps} must be >= 1")
        if self.solver_shift <= 0:
            raise ValueError(f"lcm.solver_shift={self.solver_shift} must be > 0")
        if self.huber_c < 0:
            raise ValueError(f"lcm.huber_c={self.huber_c} must be >= 0")


def solver_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """float32 [num_steps + 1] TrigFlow times from π/2 down to exactly 0: the teacher's shifted flow
    schedule (flows/trajectories.reference_route) with its end point."""
    route = reference_route(num_steps, shift) if num_steps > 1 else np.asarray([MAX_TIME], np.float32)
    return np.append(route, np.float32(0.0))


def solver_intervals(key: jax.Array, batch: int, grid: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(t [B], t_next [B]): one interval of `grid` per example, uniformly."""
    n = jax.random.randint(key, (batch,), 0, len(grid) - 1)
    grid = jnp.asarray(grid, jnp.float32)
    return grid[n], grid[n + 1]


def pseudo_huber(prediction: jax.Array, target: jax.Array, c: float) -> jax.Array:
    """mean(√((prediction − target)² + c²) − c) over all elements; c = 0 gives the mean squared error."""
    if c == 0:
        return jnp.mean((prediction - target) ** 2)
    return jnp.mean(jnp.sqrt((prediction - target) ** 2 + c**2) - c)


def lcm_loss(consistency: ConsistencyFn, params: Any, x_t: jax.Array, t: jax.Array, x_next: jax.Array,
             t_next: jax.Array, huber_c: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The consistency loss between f_θ(x_t, t) and the stop-gradient target f_θ(x_next, t_next).

    x_t, x_next: [B, ...] TrigFlow-scale states, x_next one guided teacher step from x_t; t, t_next:
    [B]. Differentiable in params through the first term only. Returns (scalar loss, metrics).
    """
    target = jax.lax.stop_gradient(consistency(jax.lax.stop_gradient(params), jax.lax.stop_gradient(x_next), t_next))
    prediction = consistency(params, x_t, t)
    loss = pseudo_huber(prediction, target, huber_c)
    return loss, {"lcm/loss": loss, "lcm/x0_mse": jnp.mean((prediction - target) ** 2)}
