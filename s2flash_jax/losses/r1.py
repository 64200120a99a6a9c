"""The R1 gradient penalty (Mescheder, Geiger, Nowozin 2018), as ADD / LADD regularise their
discriminators: γ/2 · E_real ‖∇_x D(x)‖².

Which gradient is penalised is decided by the function passed in: the whole discriminator on its
latent input (the gradient then runs back through the backbone, costly with a frozen teacher),
or only the heads on the backbone's features, as SANA-Sprint does. Lazy R1 (StyleGAN2: the
penalty every k discriminator steps) is this penalty with γ·k, applied every k-th step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from s2flash_jax.precision import at_least_fp32


def r1_penalty(logits_fn: Callable[[Any], jax.Array], x: Any, gamma: float) -> jax.Array:
    """γ/2 · mean_b ‖∇_{x_b} Σ_k logits_fn(x)[b, k]‖²: the R1 penalty on (real) examples x.

    x: an array [B, ...] or a pytree of them (e.g. one feature map [B, N, D] per head), all with
      the B examples on the leading axis; an example's squared norm sums over all its leaves.
    logits_fn: x -> logits [B, ...] (one logit per example [B], per token [B, N], ...).
    Returns a scalar, float32 (float64 for float64 inputs), differentiable with respect to
    whatever logits_fn closes over (second-order: a gradient of a gradient).

    One backward pass of the whole batch's logit sum, as torch.autograd.grad(D(x).sum(), x) in
    StyleGAN2 and ADD: example b's gradient is exactly its own when its logits depend on x_b
    alone (the conv/GroupNorm heads, a per-example backbone); heads that mix examples (the LADD
    heads' BatchNormLocal) add the other examples' logits' dependence on x_b, as the references do.
    """
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("r1_penalty needs at least one input array, got an empty pytree")
    batch = leaves[0].shape[0] if leaves[0].ndim else None
    if batch is None or any(leaf.ndim == 0 or leaf.shape[0] != batch for leaf in leaves):
        raise ValueError(f"every input must hold the examples on its leading axis, got shapes "
                         f"{[tuple(leaf.shape) for leaf in leaves]}")
    logits, pullback = jax.vjp(logits_fn, x)
    if logits.ndim == 0 or logits.shape[0] != batch:
        raise ValueError(f"logits_fn must return logits [B, ...] for the B = {batch} examples, got {logits.shape}")
    (grads,) = pullback(jnp.ones_like(logits))
    squared = sum(jnp.sum(jnp.square(at_least_fp32(g)).reshape(batch, -1), axis=1) for g in jax.tree.leaves(grads))
    return 0.5 * gamma * jnp.mean(squared)
