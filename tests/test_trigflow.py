"""TrigFlow maths on Gaussian data, where every quantity is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.flows.trigflow import (
    MAX_TIME, consistency_fn, flow_time, scm_sample, scm_timesteps, trigflow_from_flow_matching)

from tests.gaussian import DiagonalGaussian

MU = jnp.array([1.5, -0.5, 0.0])
SIGMA = jnp.array([0.3, 1.0, 2.0])  # per-dimension std of the unit-scale data x̂0
DATA = DiagonalGaussian(MU, SIGMA)
flow_velocity, trigflow_velocity = DATA.flow_velocity, DATA.trigflow_velocity


def test_flow_time_mapping():
    t = jnp.array([0.0, jnp.pi / 4, MAX_TIME])
    np.testing.assert_allclose(flow_time(t), [0.0, 0.5, 1.0], atol=1e-5)


@pytest.mark.parametrize("t", [0.05, 0.4, 0.7854, 1.2, 1.55])
def test_transformed_flow_teacher_is_the_exact_trigflow_velocity(t):
    x_hat = jax.random.normal(jax.random.key(0), (16, 3)) * 2
    ts = jnp.full((16,), t)
    np.testing.assert_allclose(trigflow_from_flow_matching(flow_velocity)(x_hat, ts), trigflow_velocity(x_hat, ts),
                               rtol=1e-4, atol=1e-4)


def test_consistency_function_of_the_exact_velocity_at_max_time_is_the_posterior_mean():
    """At t = π/2 the state is pure noise, so f must return E[x0] = σ_d·MU for any input."""
    sigma_d = 0.5
    x_t = jax.random.normal(jax.random.key(1), (8, 3)) * sigma_d
    f = consistency_fn(trigflow_velocity, x_t, jnp.full((8,), MAX_TIME), sigma_d)
    np.testing.assert_allclose(f, jnp.broadcast_to(sigma_d * MU, f.shape), atol=1e-4)


def test_timesteps():
    assert scm_timesteps(1) == [MAX_TIME, 0.0]
    np.testing.assert_allclose(scm_timesteps(4), [MAX_TIME, 0.75 * MAX_TIME, 0.5 * MAX_TIME, 0.25 * MAX_TIME, 0.0])
    assert scm_timesteps(2, (1.3,)) == [MAX_TIME, 1.3, 0.0]
    with pytest.raises(ValueError, match="2 steps need 1 intermediate"):
        scm_timesteps(2, (1.3, 1.0))
    with pytest.raises(ValueError, match="must decrease strictly"):
        scm_timesteps(3, (0.5, 1.0))


def test_shifted_timesteps_are_the_flow_schedules_warp():
    """Shift k moves each intermediate time as the flow schedule s -> k·s / (1 + (k-1)·s) moves its flow time."""
    uniform, shifted = scm_timesteps(4), scm_timesteps(4, shift=3.0)
    assert shifted[0] == MAX_TIME and shifted[-1] == 0.0
    s = np.asarray(flow_time(jnp.asarray(uniform[1:-1])))
    np.testing.assert_allclose(flow_time(jnp.asarray(shifted[1:-1])), 3 * s / (1 + 2 * s), rtol=1e-5)
    assert all(a > b for a, b in zip(shifted[1:-1], uniform[1:-1]))  # towards noise
    with pytest.raises(ValueError, match="shift"):
        scm_timesteps(2, shift=0.0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_an_exact_one_step_model_reproduces_the_data_distribution(steps):
    """An exact consistency model maps noise to data at every step count (re-noising included).

    For Gaussian data the probability-flow ODE map is affine per dimension:
    x̂0 = MU + SIGMA·(x̂_t − cos t·MU)/√(cos²t·SIGMA² + sin²t); F is solved from f = cos t·x_t − sin t·σ_d·F.
    """
    sigma_d = 0.5
    exact_f_as_trigflow = DATA.consistency_as_trigflow
    noise = jax.random.normal(jax.random.key(2), (20000, 3))
    x0 = scm_sample(exact_f_as_trigflow, noise, jax.random.key(3), scm_timesteps(steps), sigma_d) / sigma_d
    np.testing.assert_allclose(x0.mean(0), MU, atol=0.05)
    np.testing.assert_allclose(x0.std(0), SIGMA, rtol=0.03)
