"""Latent adversarial distillation (LADD) as used by SANA-Sprint: hinge losses on discriminator heads
over frozen-teacher features of re-noised latents, with the reference's sampling of times and fakes.

The networks are passed in as functions; this module only decides what is real, what is fake, at
which times, and how logits become losses (NVlabs/Sana train_scripts/train_scm_ladd.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from s2flash_jax.flows.trigflow import MAX_TIME, SIGMA_DATA, lognormal_times, noised


@dataclasses.dataclass(frozen=True)
class LADDConfig:
    """LADD hyperparameters; defaults are the SANA-Sprint yamls and config dataclass.

    p_mean, p_std: log-normal noise level at which the discriminator sees latents.
    block_ids: teacher blocks whose token features feed one head each (0-based).
    adversarial_weight: adv_lambda, the generator's weight on the adversarial term (sCM has 1).
    max_time_prob: probability that the generator's adversarial sample starts from pure noise at
      t = max_time instead of the sCM time distribution (trains 1-step generation).
    misaligned_pairs: add real latents paired with the wrong caption as extra fakes.
    independent_real_times: sample real and fake discriminator times separately (diff_timesteps_D).
    """

    p_mean: float = -0.6
    p_std: float = 1.0
    block_ids: Sequence[int] = (2, 8, 14, 19)
    adversarial_weight: float = 0.5
    max_time_prob: float = 0.5
    max_time: float = MAX_TIME
    misaligned_pairs: bool = True
    independent_real_times: bool = True

    def __post_init__(self):
        if not self.block_ids:
            raise ValueError("LADD needs at least one teacher block in block_ids")
        if not 0.0 <= self.max_time_prob <= 1.0:
            raise ValueError(f"max_time_prob={self.max_time_prob} must be a probability")


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """−mean(D(fake)). fake_logits: [B, K]."""
    return -jnp.mean(fake_logits.astype(jnp.float32))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """½·(mean relu(1 − D(real)) + mean relu(1 + D(fake))). Logits: [B, K] and [B', K]."""
    real = jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32)))
    return 0.5 * (real + fake)


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Fraction of per-token logits on the right side of zero, over real and fake together."""
    correct = jnp.sum(real_logits > 0) + jnp.sum(fake_logits < 0)
    return correct / (real_logits.size + fake_logits.size)


def generator_times(key: jax.Array, batch: int, p_mean: float, p_std: float, config: LADDConfig,
                    sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Times [B] from which the student makes its adversarial sample: the sCM distribution
    (p_mean, p_std), replaced by config.max_time with probability config.max_time_prob."""
    t_key, coin_key = jax.random.split(key)
    t = lognormal_times(t_key, batch, p_mean, p_std, sigma_data)
    return jnp.where(jax.random.bernoulli(coin_key, config.max_time_prob, (batch,)), config.max_time, t)


def discriminator_times(key: jax.Array, batch: int, config: LADDConfig,
                        sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Times [B] at which the discriminator sees latents: log-normal (config.p_mean, config.p_std)."""
    return lognormal_times(key, batch, config.p_mean, config.p_std, sigma_data)


def renoised_input(key: jax.Array, x0: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Network input x_t / σ_d [B, ...] for clean latents x0 [B, ...] at times t [B], fresh noise."""
    return noised(key, x0, t, sigma_data) / sigma_data


def misaligned(x: jax.Array) -> jax.Array:
    """Roll the batch by one, so each latent meets another example's caption. x: [B, ...]."""
    return jnp.roll(x, 1, axis=0)
