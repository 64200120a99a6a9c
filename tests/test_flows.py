"""The flow-matching sampler on a case with a known answer, and the time-embedding conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.flows.flow_matching import (
    classifier_free_guidance, euler_sample, shifted_times, standard_normal)
from s2flash_jax.models.sana import SanaConfig
from tests.gaussian import DiagonalGaussian


def gaussian_velocity(sigma: float):
    """Exact flow-matching velocity for data x0 ~ N(0, sigma^2), noise ~ N(0, 1)."""
    return DiagonalGaussian(0.0, sigma).flow_velocity


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_euler_follows_the_exact_gaussian_flow(sigma):
    """The probability-flow ODE of a Gaussian maps noise z to sigma·z; Euler converges to it."""
    noise = jax.random.normal(jax.random.key(0), (64, 3))
    coarse = euler_sample(gaussian_velocity(sigma), noise, 8)
    fine = euler_sample(gaussian_velocity(sigma), noise, 4096)
    np.testing.assert_allclose(fine, sigma * noise, rtol=1e-3, atol=1e-3)
    assert jnp.abs(coarse - sigma * noise).max() > jnp.abs(fine - sigma * noise).max()


def test_shifted_schedule_converges_to_the_same_flow_map():
    noise = jax.random.normal(jax.random.key(0), (64, 3))
    shifted = euler_sample(gaussian_velocity(2.0), noise, 4096, shift=3.0)
    np.testing.assert_allclose(shifted, 2.0 * noise, rtol=1e-3, atol=1e-3)
    times = shifted_times(4, 3.0)
    np.testing.assert_allclose(times, [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)  # 3s / (1 + 2s) at s = 1, .75, .5, .25, 0
    np.testing.assert_allclose(shifted_times(4), jnp.linspace(1.0, 0.0, 5))


def test_classifier_free_guidance_per_example_scale():
    uncond, cond = jnp.zeros((2, 2, 2)), jnp.ones((2, 2, 2))
    out = classifier_free_guidance(uncond, cond, jnp.array([1.0, 4.5]))
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 4.5)


def test_one_euler_step_is_exact_for_a_straight_flow():
    x0 = jnp.arange(6.0).reshape(2, 3)
    noise = jnp.ones((2, 3))
    assert jnp.allclose(euler_sample(lambda x, s: noise - x0, noise, 1), x0)


def test_flow_time_scale_is_the_serving_pipelines_time_unit():
    """The model takes flow time s in [0, 1]; its time embedder sees what the diffusers pipeline feeds."""
    assert SanaConfig().flow_time_scale == 1000.0  # base SANA, SanaPipeline: 1000·s
    assert SanaConfig(timestep_scale=0.001).flow_time_scale == 1.0  # Sprint teacher's dense time embedding
    assert SanaConfig(guidance_embeds=True).flow_time_scale == 1.0  # Sprint student, SanaSprintPipeline


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 4, 4, 3), (2, 3, 2, 2, 5)])
def test_standard_normal_draws_what_jax_random_normal_draws(shape):
    """The rank-2 draw it takes for speed must not change a single sampled value."""
    key = jax.random.key(11)
    np.testing.assert_array_equal(standard_normal(key, shape), jax.random.normal(key, shape))
    np.testing.assert_array_equal(jax.jit(standard_normal, static_argnums=1)(key, shape),
                                  jax.random.normal(key, shape))
