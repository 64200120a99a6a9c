"""TwinFlow's training objective (arXiv 2512.05150), as inclusionAI/TwinFlow's `TwinFlow.training_step`.

One network F(x_s, s, r, c) (flows/twinflow.py), no teacher, no discriminator. The batch is split
into four row groups ("e2e", "mul", "any", "adv"):
  e2e  s = 1, r = 0: the one-step generator;
  mul  r just below s: (near) instantaneous velocity, i.e. flow matching;
  any  r ~ U(0, s): any-step consistency;
  adv  the twin branch: inputs are the model's own one-step samples, time −s, target time −s, and
       plain flow matching there makes F(·, −s, −s) the velocity field of the generated distribution.
Non-adv targets are the data velocity z − x with classifier-free guidance baked in from a target
network (an EMA of F), then replaced by RCGM's finite-difference consistency target. The e2e rows
add the rectification loss: the one-step sample is pushed along the difference between the fake
(negative-time) and real (positive-time) velocities at a fresh noise level, DMD's distribution
matching with both scores read from F itself.

Shapes: x [B, ...] unit-scale data; s, r [B] (signed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.flow_matching import per_example, standard_normal
from s2flash_jax.flows.twinflow import data_and_noise

GROUPS = ("e2e", "mul", "any", "adv")
# (params, x_s, s, r, conditional) -> F [B, ...]; conditional False: the null caption
TwinModel = Callable[[object, jax.Array, jax.Array, jax.Array, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class TwinFlowConfig:
    """The released trainer's settings (its yaml names in brackets; defaults as its `TwinFlow`).

    group_weights: relative sizes of the e2e / mul / any / adv row groups [probs]; (0, 1, 0, 0) with
      consistency_ratio 0 is plain flow matching, adv 0 is RCGM.
    consistency_ratio: target times r = s − u·ratio·s, u ~ U(0, 1) [consistc_ratio]; 1 also enables
      the rectification loss.
    guidance_ratio: the baked-in guidance, target + ratio·(F_c − F_∅) from the target network
      [enhanced_ratio]; guidance_range: the open interval of s where it applies [enhanced_range].
    target_ema_decay: the target network's EMA decay, warmed up from 0 [ema_decay_rate]; 0 uses F
      itself, 1 keeps a frozen copy of the initial model (then guidance is the copy's CFG velocity and
      RCGM uses F).
    estimate_order: Euler sub-steps of the target network in RCGM's estimate (0: no RCGM).
    rcgm_step: the finite-difference step of RCGM (hard-coded 0.01 in the release).
    time_beta: (a, b, scale): s ~ Beta(a, b)·scale [time_dist_ctrl].
    rectify_weight: weight of the rectification (distribution-matching) loss [dist_match_cof].
    loss: "barron" (Barron's robust loss, per-sample reweighted, α = barron_alpha, c = barron_c) or "l2".
    image_free: train on the model's own one-step samples instead of data [use_image_free].
    """

    group_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    consistency_ratio: float = 1.0
    guidance_ratio: float = 0.5
    guidance_range: Sequence[float] = (0.0, 1.0)
    target_ema_decay: float = 0.99
    estimate_order: int = 2
    rcgm_step: float = 0.01
    time_beta: Sequence[float] = (1.0, 1.0, 1.0)
    rectify_weight: float = 0.5
    loss: str = "barron"
    barron_alpha: float = 1.0
    barron_c: float = 1e-3
    image_free: bool = False

    def __post_init__(self):
        problems = []
        if len(self.group_weights) != len(GROUPS) or min(self.group_weights) < 0 or not sum(self.group_weights) > 0:
            problems.append(f"group_weights={tuple(self.group_weights)} must be 4 non-negative weights "
                            f"{GROUPS} with a positive sum")
        if not 0.0 <= self.consistency_ratio <= 1.0 or not 0.0 <= self.target_ema_decay <= 1.0:
            problems.append(f"consistency_ratio={self.consistency_ratio} and target_ema_decay="
                            f"{self.target_ema_decay} must be in [0, 1]")
        if len(self.guidance_range) != 2 or len(self.time_beta) != 3 or min(self.time_beta) <= 0:
            problems.append(f"guidance_range={tuple(self.guidance_range)} must be (low, high) and time_beta="
                            f"{tuple(self.time_beta)} (a, b, scale), all positive")
        if self.estimate_order < 0 or not 0.0 < self.rcgm_step < 1.0:
            problems.append(f"estimate_order={self.estimate_order} must be >= 0 and rcgm_step={self.rcgm_step} "
                            "in (0, 1)")
        if self.loss not in ("barron", "l2") or self.barron_c <= 0:
            problems.append(f"loss={self.loss!r} must be 'barron' or 'l2' and barron_c={self.barron_c} > 0")
        if problems:
            raise ValueError("twinflow: " + "; ".join(problems))

    @property
    def uses_rectify(self) -> bool:
        return self.consistency_ratio == 1.0 and self.rectify_weight != 0.0


def group_rows(batch_size: int, weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Group name -> [B] bool mask of its contiguous rows, sized as the release rounds them (the last
    group takes the remainder)."""
    total = sum(weights)
    sizes = [int(round(batch_size * w / total)) for w in weights]
    sizes[-1] = batch_size - sum(sizes[:-1])
    if sizes[-1] < 0:
        raise ValueError(f"batch of {batch_size} cannot be split into groups {dict(zip(GROUPS, sizes))}")
    bounds = np.cumsum([0] + sizes)
    rows = np.arange(batch_size)
    return {g: (rows >= lo) & (rows < hi) for g, lo, hi in zip(GROUPS, bounds[:-1], bounds[1:])}


def robust_loss(pred: jax.Array, target: jax.Array, config: TwinFlowConfig) -> jax.Array:
    """Per-example loss [B]. Barron's: the mean square m reweighted by sg[(m/c²/|α−2| + 1)^((α−2)/2)]/c,
    about √m for large errors at α = 1, so outlying samples do not dominate."""
    mse = jnp.mean(jnp.square(pred - target).reshape(pred.shape[0], -1), axis=1)
    if config.loss == "l2":
        return mse
    alpha, c = config.barron_alpha, config.barron_c
    if abs(alpha - 2.0) < 1e-5:
        return mse / c
    weight = (mse / (c**2 + 1e-8) / abs(alpha - 2.0) + 1.0) ** ((alpha - 2.0) / 2.0)
    return mse * jax.lax.stop_gradient(weight) / c


def jump_weight(s: jax.Array, r: jax.Array) -> jax.Array:
    """tan((1 − (|s| − |r|))·π/2.5) + 1: 1 for a whole jump, ≈ 4.08 for an instantaneous velocity."""
    return jnp.tan((1.0 - (jnp.abs(s) - jnp.abs(r))) * math.pi / 2.5) + 1.0


def rcgm_target(fn: Callable, velocity: jax.Array, target: jax.Array, x_s: jax.Array, s: jax.Array, r: jax.Array,
                order: int, step: float) -> jax.Array:
    """RCGM's target for F(x_s, s, r) (arXiv 2505.07447 as TwinFlow uses it), without gradient.

    The jump s -> r that F predicts should equal one small step `step` along the target velocity
    followed by the target network's own `order`-step jump to r. The residual
    R = [(s − r)·F − step·target − P]/step (P: the sub-steps' displacement) is clipped to [−1, 1]
    and the target is sg(F) − R. Within `step` of r there is no room for a sub-step: R = F − target.
    fn: (x, s, r) -> F of the target network; velocity: F(x_s, s, r) of the trained network.
    """
    s_mid = jnp.maximum(s - step, r)
    x = x_s - step * target
    displacement = jnp.zeros_like(x)
    for i in range(order):
        s_cur = s_mid + (r - s_mid) * (i / order)
        s_next = s_mid + (r - s_mid) * ((i + 1) / order)
        jump = fn(x, s_cur, s_next) * per_example(s_cur - s_next, x)
        x, displacement = x - jump, displacement + jump
    near = per_example(s < r + step, x)
    residual = jnp.where(near, velocity - target,
                         (per_example(s - r, x) * velocity - displacement) / step - target)
    return jax.lax.stop_gradient(velocity - jnp.clip(residual, -1.0, 1.0))


def velocity_mismatch(fn: Callable, x_gen: jax.Array, key: jax.Array) -> jax.Array:
    """clip(F(x_t, −t, −t) − F(x_t, t, t), −1, 1) at a fresh t ~ U(0, 1) on the line from the samples
    x_gen [B, ...] to fresh noise: the fake minus the real velocity there, without gradient."""
    t_key, z_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (x_gen.shape[0],))
    x_t = per_example(t, x_gen) * standard_normal(z_key, x_gen.shape) + per_example(1.0 - t, x_gen) * x_gen
    fake, real = fn(x_t, -t, -t), fn(x_t, t, t)
    return jax.lax.stop_gradient(jnp.clip(fake - real, -1.0, 1.0))


def training_times(key: jax.Array, rows: dict[str, np.ndarray], config: TwinFlowConfig
                   ) -> tuple[jax.Array, jax.Array]:
    """(s, r) [B] of the positive-time groups, before the adv rows are made negative."""
    b = rows["e2e"].shape[0]
    s_key, r_key, near_key = jax.random.split(key, 3)
    a, b_, scale = config.time_beta
    s = jnp.clip(jax.random.beta(s_key, a, b_, (b,)), 0.0, 1.0) * scale
    ratio = config.consistency_ratio
    r = s - jax.random.uniform(r_key, (b,)) * ratio * s
    r_near = s - jax.random.uniform(near_key, (b,)) * s * min(0.05, ratio)
    s = jnp.where(rows["e2e"], 1.0, s)
    r = jnp.where(rows["e2e"], 0.0, jnp.where(rows["mul"], r_near, r))
    return s, r


def twinflow_loss(model: TwinModel, params, target_params, x: jax.Array, key: jax.Array,
                  config: TwinFlowConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar loss of one batch and its metrics.

    params: the trained network's (differentiated); target_params: the target network's (the EMA or
    frozen copy; None: F itself without gradient). x: [B, ...] data (ignored with config.image_free).
    """
    rows = group_rows(x.shape[0], config.group_weights)
    adv = jnp.asarray(rows["adv"])
    time_key, fake_key, free_key, z_key, rect_key = jax.random.split(key, 5)
    online = jax.lax.stop_gradient(params)
    target_net = online if target_params is None else target_params

    def one_step(p, noise):
        ones = jnp.ones((noise.shape[0],))
        return data_and_noise(noise, ones, model(p, noise, ones, jnp.zeros_like(ones), True))[0]

    s, r = training_times(time_key, rows, config)
    if config.image_free:
        x = one_step(online, standard_normal(free_key, x.shape))
    if rows["adv"].any():
        x = jnp.where(per_example(adv, x), one_step(online, standard_normal(fake_key, x.shape)), x)
    x = jax.lax.stop_gradient(x)
    z = standard_normal(z_key, x.shape)
    x_s = per_example(s, x) * z + per_example(1.0 - s, x) * x
    target = z - x
    s, r = jnp.where(adv, -s, s), jnp.where(adv, -s, r)
    velocity = model(params, x_s, s, r, True)

    if config.guidance_ratio:
        cond, uncond = model(target_net, x_s, s, s, True), model(target_net, x_s, s, s, False)
        low, high = config.guidance_range
        guided = per_example((s > low) & (s < high) & ~adv, x)
        lift = config.guidance_ratio * (cond - uncond)
        # A frozen initial copy is a better velocity than the data's: its guided velocity is the target.
        enhanced = lift + (uncond if config.target_ema_decay == 1.0 else target)
        target = jnp.where(guided, enhanced, target)
    if config.estimate_order >= 1 and config.consistency_ratio:
        rcgm_net = online if config.target_ema_decay == 1.0 else target_net
        rcgm = rcgm_target(lambda x_, s_, r_: model(rcgm_net, x_, s_, r_, True), velocity, target, x_s, s, r,
                           config.estimate_order, config.rcgm_step)
        target = jnp.where(per_example(adv, x), target, rcgm)
    target = jax.lax.stop_gradient(target)

    per_row = robust_loss(velocity, target, config) * jnp.where(adv, 1.0, jump_weight(s, r))
    loss = jnp.mean(per_row)
    metrics = {f"twinflow/{g}": jnp.sum(jnp.where(m, per_row, 0.0)) / int(m.sum())
               for g, m in rows.items() if m.any()}
    e2e = jnp.asarray(rows["e2e"])
    if config.uses_rectify and rows["e2e"].any():
        x_gen = jax.lax.stop_gradient(data_and_noise(x_s, s, velocity)[0])
        mismatch = velocity_mismatch(lambda x_, s_, r_: model(online, x_, s_, r_, True), x_gen, rect_key)
        rectify = robust_loss(velocity, jax.lax.stop_gradient(velocity - mismatch), config)
        rectify = jnp.sum(jnp.where(e2e, rectify, 0.0)) / int(rows["e2e"].sum())
        loss = loss + config.rectify_weight * rectify
        metrics["twinflow/rectify"] = rectify
        metrics["twinflow/velocity_mismatch"] = jnp.sum(
            jnp.where(per_example(e2e, x), jnp.abs(mismatch), 0.0)) / (int(rows["e2e"].sum()) * math.prod(x.shape[1:]))
    return loss, metrics
