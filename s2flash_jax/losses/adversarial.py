"""GAN losses on discriminator logits, by name: the non-saturating (softplus) losses of DMD2 and
SDXL-Lightning, and LADD's hinge losses (losses/ladd.py), so a recipe can offer either.

  non_saturating  D: mean softplus(−D(real)) + mean softplus(D(fake))    G: mean softplus(−D(fake))
  hinge           D: ½·(mean relu(1 − D(real)) + mean relu(1 + D(fake)))  G: −mean D(fake)

The non-saturating pair is DMD2's (tianweiy/DMD2 main/sd_guidance.py: no ½, unlike the hinge pair
SANA-Sprint writes). Logits: [B, ...], any float dtype; losses are float32 scalars.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from s2flash_jax.losses import ladd


def non_saturating_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """mean softplus(−D(fake)) = −mean log σ(D(fake)). fake_logits: [B, ...]."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def non_saturating_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """mean softplus(−D(real)) + mean softplus(D(fake)): the logistic loss of real against fake."""
    real = jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32)))
    return real + fake


@dataclasses.dataclass(frozen=True)
class GANLoss:
    """generator: fake logits -> loss; discriminator: (real logits, fake logits) -> loss."""

    generator: Callable[[jax.Array], jax.Array]
    discriminator: Callable[[jax.Array, jax.Array], jax.Array]


GAN_LOSSES = {
    "non_saturating": GANLoss(non_saturating_generator_loss, non_saturating_discriminator_loss),
    "hinge": GANLoss(ladd.hinge_generator_loss, ladd.hinge_discriminator_loss),
}
