"""LADD's losses and sampling rules on inputs with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.flows.trigflow import MAX_TIME, SIGMA_DATA
from s2flash_jax.losses import ladd


def test_hinge_losses():
    real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - real) = [0, .5, 2, 0] -> mean .625
    fake = jnp.array([[-3.0, 0.0], [1.0, -0.5]])  # relu(1 + fake) = [0, 1, 2, .5] -> mean .875
    np.testing.assert_allclose(ladd.hinge_discriminator_loss(real, fake), 0.5 * (0.625 + 0.875))
    np.testing.assert_allclose(ladd.hinge_generator_loss(fake), 0.625)
    np.testing.assert_allclose(ladd.discriminator_accuracy(real, fake), 5 / 8)


def test_generator_times_take_max_time_with_the_configured_probability():
    key = jax.random.key(0)
    always = ladd.generator_times(key, 64, 0.2, 1.6, ladd.LADDConfig(max_time_prob=1.0))
    never = ladd.generator_times(key, 4096, 0.2, 1.6, ladd.LADDConfig(max_time_prob=0.0))
    half = ladd.generator_times(key, 4096, 0.2, 1.6, ladd.LADDConfig(max_time_prob=0.5))
    np.testing.assert_array_equal(always, np.float32(MAX_TIME))
    assert float(jnp.max(never)) < MAX_TIME
    assert abs(float(jnp.mean(half == MAX_TIME)) - 0.5) < 0.03
    # σ_d·tan t is log-normal(0.2, 1.6): its log has that mean and std
    log_ratio = jnp.log(SIGMA_DATA * jnp.tan(never))
    np.testing.assert_allclose([log_ratio.mean(), log_ratio.std()], [0.2, 1.6], atol=0.06)


def test_discriminator_times_and_inputs():
    config = ladd.LADDConfig()
    t = ladd.discriminator_times(jax.random.key(1), 8192, config)
    log_ratio = jnp.log(SIGMA_DATA * jnp.tan(t))
    np.testing.assert_allclose([log_ratio.mean(), log_ratio.std()], [-0.6, 1.0], atol=0.04)
    x0 = jnp.full((4, 3), 0.25)
    x_hat = ladd.renoised_input(jax.random.key(2), x0, jnp.zeros(4))
    np.testing.assert_allclose(x_hat, x0 / SIGMA_DATA, rtol=1e-6)  # t = 0: no noise


def test_misaligned_pairs_pair_every_latent_with_another_caption():
    x = jnp.arange(4)
    rolled = ladd.misaligned(x)
    assert sorted(rolled.tolist()) == x.tolist() and bool(jnp.all(rolled != x))


def test_config_is_validated():
    with pytest.raises(ValueError, match="block"):
        ladd.LADDConfig(block_ids=())
    with pytest.raises(ValueError, match="probability"):
        ladd.LADDConfig(max_time_prob=1.5)
