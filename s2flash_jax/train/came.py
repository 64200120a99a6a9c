"""CAME: Confidence-guided Adaptive Memory Efficient optimisation (Luo et al., 2023, arXiv:2307.02047).

CAME is Adafactor with momentum plus a confidence term: the second moment of
the gradient is kept factored (one row and one column running average per
matrix, so O(n + m) memory instead of O(nm)), and the momentum is rescaled by
the factored inverse square root of its "instability", the running average of
(update - momentum)^2, so directions where the update keeps disagreeing with
its momentum take smaller steps.

This follows the PyPI package ``came-pytorch`` 0.1.3 (the first author's
reference implementation) step for step, including its quirks:

- no bias correction of any moment; the step count is bookkeeping only;
- leaves with fewer than two dims (biases, norm scales, 0-D scalars) are not
  factored and get no confidence term: their direction is the plain momentum
  of the clipped Adafactor update (for one-element leaves the RMS clip makes
  that update ``sign(g) * min(|u|, clip_threshold)``);
- weight decay is decoupled (it never enters the moments) but is scaled by
  the learning rate, like ``torch.optim.AdamW``;
- state is float32 for float32/bfloat16/float16 parameters (came-pytorch
  upcasts half-precision gradients) and float64 for float64 parameters.

Leaves with three or more dims are factored over their last two dims, with
the leading dims as batch. Our conv kernels are HWIO whereas torch's are OIHW,
so for conv kernels the two frameworks factor over different dims (here
(I, O), there (H, W)) and their trajectories differ; only the array layout
decides, the maths is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Betas = tuple[float, float, float]
Eps = tuple[float, float]

# A scalar stands in for the statistics a leaf does not keep (factored ones for
# unfactored leaves and vice versa) so every state field mirrors the params tree;
# not a size-0 array, which checkpoint libraries refuse to save.
_ABSENT_SHAPE = ()


class ScaleByCameState(NamedTuple):
    """Per-leaf state; each field but ``count`` has the params' tree structure.

    For a leaf of shape ``s``, factored when ``len(s) >= 2``:
      exp_avg: ``s``, momentum of the clipped update.
      exp_avg_sq_row / exp_avg_res_row: ``s[:-1]`` if factored, else ``()``.
      exp_avg_sq_col / exp_avg_res_col: ``s[:-2] + s[-1:]`` if factored, else ``()``.
      exp_avg_sq: ``s`` if unfactored, else ``()``.
    ``*_sq_*`` average the squared gradient, ``*_res_*`` the instability.
    """

    count: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq_row: optax.Updates
    exp_avg_sq_col: optax.Updates
    exp_avg_sq: optax.Updates
    exp_avg_res_row: optax.Updates
    exp_avg_res_col: optax.Updates


def _state_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _ema(avg: jax.Array, x: jax.Array, beta: float) -> jax.Array:
    return beta * avg + (1.0 - beta) * x


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _factored_rsqrt(row: jax.Array, col: jax.Array) -> jax.Array:
    """Rank-1 estimate ``(..., n, m)`` of ``1 / sqrt(avg)`` from its row ``(..., n)`` and column ``(..., m)`` means.

    The rows are normalised by their mean so the product has the scale of the
    full average (Adafactor's estimator).
    """
    r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
    return r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def _unzip(treedef, per_leaf: list[tuple], n: int) -> list:
    """Per-leaf n-tuples -> n trees of ``treedef`` (also for an empty tree)."""
    return [treedef.unflatten([leaf[i] for leaf in per_leaf]) for i in range(n)]


def _came_leaf(g, exp_avg, sq_row, sq_col, sq, res_row, res_col, *, betas, eps, clip_threshold):
    """One came-pytorch step for one leaf; returns the direction and the new statistics."""
    b1, b2, b3 = betas
    g = g.astype(exp_avg.dtype)
    factored = g.ndim >= 2

    g_sq = jnp.square(g) + eps[0]
    if factored:
        sq_row = _ema(sq_row, jnp.mean(g_sq, axis=-1), b2)
        sq_col = _ema(sq_col, jnp.mean(g_sq, axis=-2), b2)
        u = _factored_rsqrt(sq_row, sq_col) * g
    else:
        sq = _ema(sq, g_sq, b2)
        u = jax.lax.rsqrt(sq) * g
    u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)

    exp_avg = _ema(exp_avg, u, b1)
    if factored:
        res = jnp.square(u - exp_avg) + eps[1]
        res_row = _ema(res_row, jnp.mean(res, axis=-1), b3)
        res_col = _ema(res_col, jnp.mean(res, axis=-2), b3)
        u = _factored_rsqrt(res_row, res_col) * exp_avg
    else:
        u = exp_avg
    return u, exp_avg, sq_row, sq_col, sq, res_row, res_col


def scale_by_came(
    betas: Betas = (0.9, 0.999, 0.9999),
    eps: Eps = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
    """The CAME direction, without learning rate, weight decay or sign flip.

    betas: decay of the momentum, the squared-gradient average and the instability average.
    eps: added to the squared gradient and to the instability before averaging.
    clip_threshold: the Adafactor update is scaled down until its RMS is at most this.
    """

    def init_fn(params):
        def leaf_state(p):
            # A fresh buffer per field: shared zeros would make a donated optimizer state donate
            # one buffer twice.
            dtype = _state_dtype(p.dtype)

            def zeros(shape):
                return jnp.zeros(shape, dtype)

            if p.ndim < 2:
                return (zeros(p.shape), zeros(_ABSENT_SHAPE), zeros(_ABSENT_SHAPE), zeros(p.shape),
                        zeros(_ABSENT_SHAPE), zeros(_ABSENT_SHAPE))
            row, col = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
            return zeros(p.shape), zeros(row), zeros(col), zeros(_ABSENT_SHAPE), zeros(row), zeros(col)

        treedef = jax.tree.structure(params)
        per_leaf = [leaf_state(p) for p in treedef.flatten_up_to(params)]
        return ScaleByCameState(jnp.zeros([], jnp.int32), *_unzip(treedef, per_leaf, 6))

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        per_field = [treedef.flatten_up_to(tree) for tree in (updates, *state[1:])]
        per_leaf = [
            _came_leaf(*leaf, betas=betas, eps=eps, clip_threshold=clip_threshold) for leaf in zip(*per_field)
        ]
        direction, *stats = _unzip(treedef, per_leaf, 7)
        return direction, ScaleByCameState(optax.safe_increment(state.count), *stats)

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    betas: Betas = (0.9, 0.999, 0.9999),
    eps: Eps = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """CAME as in ``came_pytorch.CAME(params, lr, eps, clip_threshold, betas, weight_decay)``.

    came-pytorch does ``p -= lr * wd * p`` then ``p -= lr * d``, i.e.
    ``p -= lr * (d + wd * p)`` since ``d`` does not depend on ``p``: the decay
    is added to the direction before the learning rate scales both.
    """
    # came-pytorch asserts lr > 0; a schedule can only be checked when called.
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    return optax.chain(
        scale_by_came(betas, eps, clip_threshold),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
