"""Optimizers of a training run, built from `TrainConfig` out of optax parts.

Every trained network gets: global-norm clipping -> CAME or AdamW with a warm-up/decay schedule ->
a non-finite guard (`optax.apply_if_finite`) that skips an update whose gradient has a NaN/Inf,
leaves parameters and moments unchanged and counts it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from s2flash_jax.train.came import came


def learning_rate_schedule(config, updates: int) -> optax.Schedule:
    """config: TrainConfig; updates: how many updates this network gets in the run. Linear warm-up
    from 0 over warmup_steps of them, then constant / cosine / linear decay reaching
    end_learning_rate at the last one."""
    peak, end, warmup = config.learning_rate, config.end_learning_rate, config.warmup_steps
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        remaining = max(1, updates - warmup)
        decay = (optax.cosine_decay_schedule(peak, remaining, alpha=end / peak) if config.schedule == "cosine"
                 else optax.linear_schedule(peak, end, remaining))
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def optimizer(kind: str, learning_rate: optax.ScalarOrSchedule, *, clip_norm: float, weight_decay: float = 0.0,
              max_consecutive_skips: int = 100) -> optax.GradientTransformation:
    """kind: "came" (SANA-Sprint's betas (0.9, 0.999, 0.9999) and eps (1e-30, 1e-16)) or "adamw"."""
    if kind == "came":
        base = came(learning_rate, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=weight_decay)
    elif kind == "adamw":
        base = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {kind!r}; expected 'came' or 'adamw'")
    # After max_consecutive_skips in a row the updates are applied anyway, so a diverged run
    # surfaces as NaN parameters instead of silently stalling.
    return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(clip_norm), base),
                                 max_consecutive_errors=max_consecutive_skips)


def optimizer_from_config(config, updates: int, trainable: Sequence[str] = ()) -> optax.GradientTransformation:
    """config: TrainConfig; updates: how many updates the network it optimises gets in the run;
    trainable: see only_trainable (config.train.trainable, for the run's product network)."""
    return only_trainable(optimizer(config.optimizer, learning_rate_schedule(config, updates),
                                    clip_norm=config.clip_norm, weight_decay=config.weight_decay,
                                    max_consecutive_skips=config.max_consecutive_skips), trainable)


def parameter_path(path: tuple) -> str:
    """A pytree key path of a parameter tree as 'time_embed/linear/kernel' (nnx.Variable's own key dropped)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path if not isinstance(k, jax.tree_util.GetAttrKey))


def only_trainable(inner: optax.GradientTransformation, patterns: Sequence[str]) -> optax.GradientTransformation:
    """`inner` on the parameters whose path (parameter_path) matches one of the glob `patterns`;
    the others get zero updates and no optimizer state. Gradient clipping and the non-finite guard
    see only the trained parameters. No patterns: `inner` on everything."""
    if not patterns:
        return inner

    def labels(params):
        paths = [parameter_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(path, p) for path in paths)]
        if unmatched:
            raise ValueError(f"train.trainable: {unmatched} match no parameter; paths look like {paths[:3]}")
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "trained" if any(fnmatch.fnmatchcase(parameter_path(path), p) for p in patterns)
            else "frozen", params)

    return optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, labels)


def skipped_updates(opt_state) -> jax.Array:
    """[] int32: non-finite updates skipped so far, summed over every guard in `opt_state`."""
    guards = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
              if isinstance(s, optax.ApplyIfFiniteState)]
    return sum((g.total_notfinite.astype(jnp.int32) for g in guards), jnp.zeros((), jnp.int32))
