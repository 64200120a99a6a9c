"""TBCM: image-free sCM distillation on the teacher's own sampling trajectories (arXiv 2511.20410).

Trains: `student` (as in SANA-Sprint: guidance embedding, logvar head). Frozen: `teacher` and the
null caption. One phase, "generator": for each prompt of the batch the teacher samples from fresh
noise with classifier-free guidance through this step's route (flows/trajectories.py), and the
states it visits, with its guided velocity there, are the sCM points (losses/scm.consistency_loss).
Batches are captions only: {"caption": [B, L, D], "caption_mask": [B, L]}.

As hustvl/TBCM's released trainer: no discriminator, the pure-noise point is left out (its sCM
weight is 0), the teacher call that advances the trajectory is also the tangent's target. Not
taken: its black-image filter (for SANA's dark-sample collapse; the shapes scenes are on black).

Added (the released trainer has none): an optional replay buffer of past trajectory points in
`state.stats["tbcm_replay"]`, so each expensive teacher rollout trains the student more than once.
A stored point stays a valid sCM target for as long as the teacher is frozen: its tangent is the
teacher's velocity, and the student's own derivative is taken afresh at every use.
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
from s2flash_jax.models.backbone import Backbone
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import (
    TrigFlowNetworks, check_student_and_teacher, reference_optimizer, student_only_builder)
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry


@dataclasses.dataclass(frozen=True)
class TBCMConfig:
    """route_points: trajectory states per prompt, π/2 included (hustvl/TBCM: 16); route_shift: the
    teacher's flow shift for the reference route (TBCM: 2.5); route_strategy: one of
    ROUTE_STRATEGIES; points_per_trajectory: how many of the route_points - 1 states each prompt
    contributes to a step's loss (0: all; fewer bound the student's batch, which is B times it).
    replay_size: trajectory points kept across steps in a ring buffer (0: no buffer); it must hold
    at least one step's fresh points (points · per-step batch). replay_points: points drawn from
    it (uniformly, with replacement, after this step's are written) and trained on beside the fresh
    ones each step (0: as many as the fresh ones). The buffer is replicated on every device and checkpointed with the run.
    scm: the loss's settings (its p_mean / p_std only matter for sorted_lognormal)."""

    scm: SCMConfig = SCMConfig()
    route_points: int = 16
    route_shift: float = 2.5
    route_strategy: str = "stratified"
    points_per_trajectory: int = 0
    replay_size: int = 0
    replay_points: int = 0

    def __post_init__(self):
        if self.route_strategy not in ROUTE_STRATEGIES:
            raise ValueError(f"tbcm.route_strategy={self.route_strategy!r}; expected one of {ROUTE_STRATEGIES}")
        if self.route_points < 2 or self.route_shift <= 0:
            raise ValueError(f"tbcm.route_points={self.route_points} must be >= 2 and route_shift="
                             f"{self.route_shift} > 0")
        if not 0 <= self.points_per_trajectory <= self.route_points - 1:
            raise ValueError(f"tbcm.points_per_trajectory={self.points_per_trajectory} must be in "
                             f"[0, route_points - 1 = {self.route_points - 1}]")
        if self.replay_size < 0 or self.replay_points < 0:
            raise ValueError(f"tbcm.replay_size={self.replay_size} and tbcm.replay_points={self.replay_points} "
                             "must be >= 0")

    @property
    def points(self) -> int:
        return self.points_per_trajectory or self.route_points - 1


def trajectory_points(nets: TrigFlowNetworks, state: DistillState, batch, key: jax.Array, config: TBCMConfig,
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


REPLAY_FIELDS = ("x_t", "t", "dxt_dt", "w", "caption", "caption_mask")


def empty_replay(size: int, latent_shape: tuple[int, ...], caption_shape: tuple[int, int]) -> dict[str, jax.Array]:
    """A replay buffer of `size` trajectory points, none filled: one array per REPLAY_FIELDS with
    leading dimension size, plus "next" (the slot the next point goes to) and "count" (filled slots)."""
    return {"x_t": jnp.zeros((size, *latent_shape), jnp.float32), "t": jnp.zeros((size,), jnp.float32),
            "dxt_dt": jnp.zeros((size, *latent_shape), jnp.float32), "w": jnp.zeros((size,), jnp.float32),
            "caption": jnp.zeros((size, *caption_shape), jnp.float32),
            "caption_mask": jnp.zeros((size, caption_shape[0]), jnp.int32),
            "next": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}


def replay_write(buffer: dict[str, jax.Array], rows: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The buffer with `rows` (REPLAY_FIELDS, each [n, ...]) written at the next n slots, wrapping
    round and overwriting the oldest points once full."""
    size, n = buffer["t"].shape[0], rows["t"].shape[0]
    if n > size:
        raise ValueError(f"tbcm.replay_size={size} cannot hold one step's {n} trajectory points; "
                         f"expected replay_size >= {n} (points · per-step batch)")
    for name in ("x_t", "caption", "caption_mask"):
        if rows[name].shape[1:] != buffer[name].shape[1:]:
            raise ValueError(f"TBCM replay: {name} rows have shape {rows[name].shape[1:]}, the buffer holds "
                             f"{buffer[name].shape[1:]} (captions must be padded to the null caption's length)")
    slots = (buffer["next"] + jnp.arange(n)) % size
    written = {k: buffer[k].at[slots].set(rows[k].astype(buffer[k].dtype)) for k in REPLAY_FIELDS}
    return {**written, "next": (buffer["next"] + n) % size, "count": jnp.minimum(buffer["count"] + n, size)}


def replay_draw(buffer: dict[str, jax.Array], key: jax.Array, n: int) -> dict[str, jax.Array]:
    """n points drawn uniformly, with replacement, from the filled slots (at least one must be)."""
    slots = jax.random.randint(key, (n,), 0, jnp.maximum(buffer["count"], 1))
    return {k: buffer[k][slots] for k in REPLAY_FIELDS}


def tbcm(student: Backbone, teacher: Backbone, null_caption: jax.Array,
         config: TBCMConfig = TBCMConfig(), optimizer: optax.GradientTransformation | None = None
         ) -> tuple[Recipe, DistillState]:
    """The TBCM recipe over these networks, and its initial state (null_caption: [L, caption_channels],
    each prompt's own mask; optimizer defaults to SANA-Sprint's CAME)."""
    problems = check_student_and_teacher(student, teacher, config.scm, null_caption)
    if config.replay_points and not config.replay_size:
        problems.append(f"tbcm.replay_points={config.replay_points} draws from a replay buffer, but "
                        "tbcm.replay_size=0 keeps none (set replay_size > 0)")
    if problems:
        raise ValueError("TBCM networks do not fit together: " + "; ".join(problems))
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    nets = TrigFlowNetworks(s_graph, t_graph)

    tc = teacher.config
    latent_shape = (tc.sample_size, tc.sample_size, tc.in_channels)

    def generator_loss(params, state: DistillState, batch, key):
        points_key, replay_key = jax.random.split(key)
        x_t, t, dxt_dt, w, captions, _ = trajectory_points(nets, state, batch, points_key, config, latent_shape)
        rows = {"x_t": x_t, "t": t, "dxt_dt": dxt_dt, "w": w, **captions}
        stats, replay_metrics = {}, {}
        if config.replay_size:
            buffer = replay_write(state.stats["tbcm_replay"], rows)
            replayed = replay_draw(buffer, replay_key, config.replay_points or rows["t"].shape[0])
            rows = {k: jnp.concatenate([rows[k], replayed[k].astype(rows[k].dtype)]) for k in REPLAY_FIELDS}
            stats, replay_metrics = {"tbcm_replay": buffer}, {"tbcm/replay_filled": buffer["count"]}
        captions = {"caption": rows["caption"], "caption_mask": rows["caption_mask"]}
        loss, metrics = consistency_loss(nets.student_fn(captions), params, rows["x_t"], rows["t"], rows["dxt_dt"],
                                         rows["w"], state.step, config.scm)
        return loss, ({**metrics, **replay_metrics}, stats)

    recipe = Recipe(name="tbcm", trains=("student",), frozen=("teacher", "null_caption"),
                    phases={"generator": Phase("generator", "student", generator_loss)}, cycle=("generator",),
                    optimizers={"student": optimizer or reference_optimizer()}, product="student",
                    needs_latents=False)
    state = recipe.init_state(params={"student": s_params},
                              frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption),
                                      "null_caption_mask": None},
                              stats={"tbcm_replay": empty_replay(config.replay_size, latent_shape, null_caption.shape)}
                              if config.replay_size else None)
    return recipe, state


ENTRY = RecipeEntry("tbcm", TBCMConfig, student_only_builder(tbcm), teacher="frozen",
                    summary="TBCM: image-free consistency on the teacher's own trajectories",
                    demo=DemoEntry("tbcm", "tbcm", "student-tbcm", "TBCM student", prompts_only=True))
