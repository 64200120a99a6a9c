"""LCM / LCM-LoRA: the solver grid is the teacher's own sampler, the loss's target carries no gradient,
an MLP distilled on the analytic Gaussian teacher samples its moments in few steps, and `s2flash
train` on the tiny LoRA config trains only the adapters and resumes bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2flash_jax.config import load_config
from s2flash_jax.flows.flow_matching import shifted_times
from s2flash_jax.flows.trajectories import reference_route
from s2flash_jax.flows.trigflow import (
    MAX_TIME, SIGMA_DATA, consistency_fn, ddim_step, flow_input, flow_time, noised, trigflow_from_flow_matching)
from s2flash_jax.losses.lcm import LCMConfig, lcm_loss, pseudo_huber, solver_grid, solver_intervals
from s2flash_jax.models.lora import ADAPTER_NAMES
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.train.loop import train
from s2flash_jax.train.state import create_train_state
from tests.gaussian import DiagonalGaussian, assert_consistency_samples_match, time_mlp
from tests.test_student_init import flat, random_checkpoint
from tests.test_train import assert_states_equal
from tests.tiny_data import write_tiny_dataset

DATA = DiagonalGaussian(jnp.array([0.8, -0.4]), jnp.array([0.3, 1.2]))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (20, 3.0), (50, 1.0)])
def test_solver_grid_is_the_teachers_shifted_schedule_from_pure_noise_to_zero(steps, shift):
    grid = solver_grid(steps, shift)
    assert grid.shape == (steps + 1,) and grid[0] == np.float32(MAX_TIME) and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)
    np.testing.assert_allclose(np.asarray(flow_time(jnp.asarray(grid[1:]))), np.asarray(shifted_times(steps, shift))[1:],
                               atol=1e-6)
    if steps > 1:
        np.testing.assert_array_equal(grid[:-1], reference_route(steps, shift))


def test_a_ddim_step_of_the_trigflow_teacher_is_an_euler_step_of_its_flow_sampler():
    """So each solver interval is exactly one step of the teacher's own (Euler) sampler."""
    x_hat = jax.random.normal(jax.random.key(0), (6, 2))
    t, t_next = jnp.linspace(1.5, 0.3, 6), jnp.linspace(1.2, 0.0, 6)
    trig = trigflow_from_flow_matching(DATA.flow_velocity)
    x_next = ddim_step(x_hat, t, t_next, trig(x_hat, t))
    x_flow, s = flow_input(x_hat, t)
    s_next = flow_time(t_next)
    euler = x_flow + (s_next - s)[:, None] * DATA.flow_velocity(x_flow, s)
    expected, _ = flow_input(jnp.ones_like(x_hat), t_next)  # the flow-to-TrigFlow norm at t_next
    np.testing.assert_allclose(np.asarray(x_next), np.asarray(euler / expected), rtol=1e-5, atol=1e-6)


def test_the_loss_trains_the_prediction_towards_a_target_that_gets_no_gradient():
    """For f_p(x) = p·x and c = 0: d/dp mean((p·x_t − p·x')²) with the target held is 2·mean((p·x_t − p·x')·x_t)."""
    x_t, x_next = jax.random.normal(jax.random.key(1), (2, 5, 3))
    t, t_next = jnp.full((5,), 1.0), jnp.full((5,), 0.5)
    p = jnp.float32(0.7)
    grad = jax.grad(lambda q: lcm_loss(lambda q, x, s: q * x, q, x_t, t, x_next, t_next, 0.0)[0])(p)
    np.testing.assert_allclose(float(grad), float(2 * jnp.mean((p * x_t - p * x_next) * x_t)), rtol=1e-5)
    # Pseudo-Huber: ~ squared error / (2c) for small differences, ~ |difference| for large ones.
    small, large = jnp.float32(3e-5), jnp.float32(10.0)
    np.testing.assert_allclose(float(pseudo_huber(small, 0.0, 1e-3)), 9e-10 / 2e-3, rtol=2e-3)
    np.testing.assert_allclose(float(pseudo_huber(large, 0.0, 1e-3)), 10.0 - 1e-3, rtol=1e-5)


def test_solver_intervals_are_adjacent_grid_points_and_cover_the_grid():
    grid = solver_grid(8, 3.0)
    t, t_next = solver_intervals(jax.random.key(2), 4000, grid)
    index = np.searchsorted(-grid, -np.asarray(t))
    np.testing.assert_array_equal(np.asarray(t), grid[index])
    np.testing.assert_array_equal(np.asarray(t_next), grid[index + 1])
    assert set(index.tolist()) == set(range(8))


def test_lcm_distilled_mlp_samples_the_gaussian_in_1_2_and_4_steps():
    """Trained only through one-step consistency on the analytic teacher's 32-step grid, a small MLP
    student samples the target: mean within 0.1 standard deviations and standard deviation within
    10 %, per dimension, at 1, 2 and 4 steps. (On an 8-step grid the solver's own error shows: the
    narrow dimension's spread comes out ~20 % small.)"""
    params, mlp = time_mlp(jax.random.key(0))
    grid = solver_grid(32, 2.0)
    updates, batch = 4000, 1024
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, updates))

    def consistency(p, x, t):
        return consistency_fn(lambda x_hat, s: mlp(p, x_hat, s), x, t)

    @jax.jit
    def distil(params):
        def step(carry, i):
            params, opt_state = carry
            keys = jax.random.split(jax.random.fold_in(jax.random.key(1), i), 3)
            x0 = SIGMA_DATA * (DATA.mu + DATA.sigma * jax.random.normal(keys[0], (batch, 2)))
            t, t_next = solver_intervals(keys[1], batch, grid)
            x_t = noised(keys[2], x0, t)
            x_next = ddim_step(x_t, t, t_next, SIGMA_DATA * DATA.trigflow_velocity(x_t / SIGMA_DATA, t))
            grads = jax.grad(lambda p: lcm_loss(consistency, p, x_t, t, x_next, t_next, 1e-3)[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(updates))[0][0]

    params = distil(params)
    assert_consistency_samples_match(DATA, lambda x, t: mlp(params, x, t))


def test_train_command_trains_only_the_lora_adapters(tmp_path):
    """`s2flash train --config configs/tiny.py:lcm` (a random teacher whose output layer is not zero, so
    gradients reach the blocks): every adapter trains and nothing else moves. (Resume is the engine's,
    tested with every other recipe; LCM keeps no state of its own.)"""
    data = write_tiny_dataset(tmp_path / "data", num_records=32)
    teacher = random_checkpoint(tmp_path / "teacher", load_config("configs/tiny.py:lcm").teacher, seed=2)
    overrides = [f"data.path={data}", f"train.teacher_checkpoint={teacher}", "train.steps=3", "train.log_every=0",
                 "train.checkpoint_every=3", "train.learning_rate=1e-2"]
    config = load_config("configs/tiny.py:lcm", overrides)
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    assert all(np.isfinite(m["lcm/loss"]) and m["lcm/loss"] > 0 for m in whole.losses)

    _, initial, _ = create_train_state(config, make_mesh(config.mesh))
    before, after = flat(initial.distill.params["student"]), flat(whole.state.distill.params["student"])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    adapters = {k for k in before if k.rsplit("/", 1)[-1] in ADAPTER_NAMES}
    assert len(adapters) == 2 * len(config.model.lora_layers) and changed == adapters
    assert_states_equal(whole.state.distill.frozen, initial.distill.frozen)


def test_config_is_validated():
    for bad, key in [(dict(solver_steps=0), "solver_steps"), (dict(solver_shift=0.0), "solver_shift"),
                     (dict(huber_c=-1.0), "huber_c")]:
        with pytest.raises(ValueError, match=f"lcm.{key}"):
            LCMConfig(**bad)
