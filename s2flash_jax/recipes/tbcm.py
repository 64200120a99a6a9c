"""TBCM: image-free sCM distillation on the teacher's own sampling trajectories (arXiv 2511.20410).

Trains: `student` (as in SANA-Sprint: guidance embedding, logvar head). Frozen: `teacher` and the
null caption. One phase, "generator": for each prompt of the batch the teacher samples from fresh
noise with classifier-free guidance through this step's route (flows/trajectories.py), and the
states it visits, with its guided velocity there, are the sCM points (losses/scm.consistency_loss).
Batches are captions only: {"caption": [B, L, D], "caption_mask": [B, L]}.

As hustvl/TBCM's released trainer: no discriminator, the pure-noise point is left out (its sCM
weight is 0), the teacher call that advances the trajectory is also the tangent's target. Not
taken: its black-image filter (for SANA's dark-sample collapse; the shapes scenes are on black).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import classifier_free_guidance, standard_normal
from s2flash_jax.flows.trajectories import ROUTE_STRATEGIES, reference_route, route_times, teacher_trajectory
from s2flash_jax.losses.scm import SCMConfig, consistency_loss, sample_guidance_scales
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.sana_sprint import (
    SanaSprintConfig, SprintNetworks, check_student_and_teacher, reference_optimizer)


@dataclasses.dataclass(frozen=True)
class TBCMConfig:
    """route_points: trajectory states per prompt, π/2 included (hustvl/TBCM: 16); route_shift: the
    teacher's flow shift for the reference route (TBCM: 2.5); route_strategy: one of
    ROUTE_STRATEGIES; points_per_trajectory: how many of the route_points - 1 states each prompt
    contributes to a step's loss (0: all; fewer bound the student's batch, which is B times it).
    scm: the loss's settings (its p_mean / p_std only matter for sorted_lognormal)."""

    scm: SCMConfig = SCMConfig()
    route_points: int = 16
    route_shift: float = 2.5
    route_strategy: str = "stratified"
    points_per_trajectory: int = 0

    def __post_init__(self):
        if self.route_strategy not in ROUTE_STRATEGIES:
            raise ValueError(f"tbcm.route_strategy={self.route_strategy!r}; expected one of {ROUTE_STRATEGIES}")
        if self.route_points < 2 or self.route_shift <= 0:
            raise ValueError(f"tbcm.route_points={self.route_points} must be >= 2 and route_shift="
                             f"{self.route_shift} > 0")
        if not 0 <= self.points_per_trajectory <= self.route_points - 1:
            raise ValueError(f"tbcm.points_per_trajectory={self.points_per_trajectory} must be in "
                             f"[0, route_points - 1 = {self.route_points - 1}]")

    @property
    def points(self) -> int:
        return self.points_per_trajectory or self.route_points - 1


def trajectory_points(nets: SprintNetworks, state: DistillState, batch, key: jax.Array, config: TBCMConfig,
                      latent_shape: tuple[int, int, int]):
    """This step's sCM points: (x_t [n·B, ...], t [n·B], dx_t/dt [n·B, ...], w [n·B], captions
    repeated {"caption", "caption_mask"} [n·B, ...], the trajectories' x0 [B, ...]), point-major
    (rows j·B .. j·B + B - 1 are the batch at the j-th chosen time), all without gradient.
    latent_shape: [H, W, C] of the teacher's latents."""
    sd = config.scm.sigma_data
    b = batch["caption"].shape[0]
    w_key, z_key, route_key, pick_key = jax.random.split(key, 4)
    w = sample_guidance_scales(w_key, b, config.scm)
    teacher = nets.teacher_fn(state, batch)

    def velocity(x, t):
        return sd * classifier_free_guidance(*teacher(x / sd, t), w)

    times = route_times(route_key, reference_route(config.route_points, config.route_shift),
                        config.route_strategy, config.scm.p_mean, config.scm.p_std, sd)
    noise = standard_normal(z_key, (b, *latent_shape)) * sd
    states, velocities, x0 = jax.lax.stop_gradient(teacher_trajectory(velocity, noise, times))
    # The pure-noise state (index 0) carries no sCM weight (1/tan(π/2) = 0): choose among the others.
    chosen = 1 + jax.random.permutation(pick_key, config.route_points - 1)[:config.points]
    n = config.points

    def rows(x):
        return x.reshape((n * b,) + x.shape[2:])

    repeat = lambda x: jnp.tile(x, (n,) + (1,) * (x.ndim - 1))  # noqa: E731
    captions = {"caption": repeat(batch["caption"]), "caption_mask": repeat(batch["caption_mask"])}
    return (rows(states[chosen]), jnp.repeat(times[chosen], b), rows(velocities[chosen]), repeat(w), captions, x0)


def tbcm(student: SanaTransformer, teacher: SanaTransformer, null_caption: jax.Array,
         config: TBCMConfig = TBCMConfig(), optimizer: optax.GradientTransformation | None = None
         ) -> tuple[Recipe, DistillState]:
    """The TBCM recipe over these networks, and its initial state (null_caption: [L, caption_channels],
    each prompt's own mask; optimizer defaults to SANA-Sprint's CAME)."""
    problems = check_student_and_teacher(student, teacher, config.scm)
    if problems:
        raise ValueError("TBCM networks do not fit together: " + "; ".join(problems))
    if null_caption.ndim != 2 or null_caption.shape[1] != teacher.config.caption_channels:
        raise ValueError(f"null_caption has shape {null_caption.shape}; expected [L, "
                         f"{teacher.config.caption_channels}] (caption length, caption_channels)")
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    nets = SprintNetworks(s_graph, t_graph, None, SanaSprintConfig(scm=config.scm))

    tc = teacher.config
    latent_shape = (tc.sample_size, tc.sample_size, tc.in_channels)

    def generator_loss(params, state: DistillState, batch, key):
        x_t, t, dxt_dt, w, captions, _ = trajectory_points(nets, state, batch, key, config, latent_shape)
        loss, metrics = consistency_loss(nets.student_fn(captions), params, x_t, t, dxt_dt, w, state.step, config.scm)
        return loss, (metrics, {})

    recipe = Recipe(name="tbcm", trains=("student",), frozen=("teacher", "null_caption"),
                    phases={"generator": Phase("generator", "student", generator_loss)}, cycle=("generator",),
                    optimizers={"student": optimizer or reference_optimizer()}, product="student",
                    needs_latents=False)
    state = recipe.init_state(params={"student": s_params},
                              frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption),
                                      "null_caption_mask": None})
    return recipe, state
