"""TBCM: trajectory routes, the teacher's trajectories as training points, and image-free distillation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from s2flash_jax.config import load_config
from s2flash_jax.data.records import DataError
from s2flash_jax.flows.flow_matching import classifier_free_guidance, shifted_times
from s2flash_jax.flows.trajectories import reference_route, route_times, teacher_trajectory
from s2flash_jax.flows.trigflow import MAX_TIME, SIGMA_DATA, flow_time
from s2flash_jax.losses.scm import SCMConfig, consistency_loss
from s2flash_jax.recipes.common import TrigFlowNetworks
from s2flash_jax.recipes.tbcm import TBCMConfig, empty_replay, replay_draw, replay_write, tbcm, trajectory_points
from s2flash_jax.train.loop import train
from tests.gaussian import DiagonalGaussian, assert_consistency_samples_match, time_mlp
from tests.test_sana_sprint import CAPTION, networks
from tests.tiny_data import write_tiny_dataset

DATA = DiagonalGaussian(jnp.array([0.8, -0.4]), jnp.array([0.3, 1.2]))


def gaussian_velocity(x, t):
    """dx_t/dt of the exact Gaussian flow in TrigFlow scale (x = σ_d·x̂)."""
    return SIGMA_DATA * DATA.trigflow_velocity(x / SIGMA_DATA, t)


def test_reference_route_is_the_teachers_shifted_flow_schedule():
    route = reference_route(8, shift=2.5)
    assert route[0] == pytest.approx(MAX_TIME) and np.all(np.diff(route) < 0) and route[-1] > 0
    np.testing.assert_allclose(flow_time(jnp.asarray(route)), shifted_times(8, 2.5)[:-1], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        reference_route(1)


@pytest.mark.parametrize("strategy", ["reference", "stratified", "sorted_lognormal"])
def test_every_route_strategy_starts_at_pure_noise_and_decreases(strategy):
    route = reference_route(6, 2.5)
    for seed in range(20):
        t = np.asarray(route_times(jax.random.key(seed), route, strategy))
        assert t.shape == (6,) and t[0] == pytest.approx(MAX_TIME)
        assert np.all(np.diff(t) < 0) and t[-1] > 0, t
        if strategy == "stratified":  # one draw inside each interval of the reference route
            upper = np.concatenate([route[:1], route[2:]])
            assert np.all((t[1:] <= upper) & (t[1:] >= np.append(route[2:], 0.0))), (t, route)
    assert not np.allclose(route_times(jax.random.key(0), route, "stratified"),
                           route_times(jax.random.key(1), route, "stratified"))


def test_trajectory_states_lie_on_the_exact_gaussian_ode():
    """Every stored state's exact ODE endpoint is the trajectory's own x0 (to the route's discretisation
    error, first order in the step: 0.01·σ_d at 256 steps); a state paired with another trajectory's x0
    is far from it."""
    times = reference_route(256, 1.0)
    noise = SIGMA_DATA * jax.random.normal(jax.random.key(0), (512, 2))
    states, velocities, x0 = teacher_trajectory(gaussian_velocity, noise, times)
    assert states.shape == velocities.shape == (256, 512, 2)
    np.testing.assert_allclose(velocities[10], gaussian_velocity(states[10], jnp.full((512,), times[10])), rtol=1e-5)
    for i in (1, 64, 160, 255):
        endpoint = SIGMA_DATA * DATA.ode_endpoint(states[i] / SIGMA_DATA, jnp.full((512,), times[i]))
        np.testing.assert_allclose(endpoint, x0, atol=0.03 * SIGMA_DATA, err_msg=f"state {i}")
        assert np.abs(endpoint - jnp.roll(x0, 1, axis=0)).mean() > 0.1 * SIGMA_DATA
    # The samples themselves follow the data distribution.
    np.testing.assert_allclose(np.mean(x0, 0) / SIGMA_DATA, DATA.mu, atol=0.1)
    np.testing.assert_allclose(np.std(x0, 0) / SIGMA_DATA, DATA.sigma, rtol=0.1)


@pytest.fixture(scope="module")
def recipe_setup():
    student, teacher, _ = networks()
    config = TBCMConfig(SCMConfig(guidance_scales=(2.0, 4.0)), route_points=5, route_shift=2.0,
                        route_strategy="reference", points_per_trajectory=3)
    channels = teacher.config.caption_channels
    recipe, state = tbcm(student, teacher, jnp.zeros((CAPTION, channels)), config, optax.adam(1e-3))
    keys = jax.random.split(jax.random.key(6), 2)
    batch = {"caption": jax.random.normal(keys[0], (4, CAPTION, channels)),
             "caption_mask": jnp.ones((4, CAPTION), jnp.int32).at[::2, -1].set(0)}
    graphs = TrigFlowNetworks(nnx.graphdef(student), nnx.graphdef(teacher))
    shape = (teacher.config.sample_size, teacher.config.sample_size, teacher.config.in_channels)
    return recipe, state, batch, graphs, config, shape


def test_recipe_points_reach_their_trajectorys_x0_when_the_teacher_continues_from_them(recipe_setup):
    """Each training row (state, time, guidance scale, caption) is one the teacher visited: integrating
    the guided teacher on from it along the rest of the route lands on that prompt's sample."""
    _, state, batch, graphs, config, shape = recipe_setup
    x_t, t, dxt_dt, w, rows, x0 = trajectory_points(graphs, state, batch, jax.random.key(3), config, shape)
    b = batch["caption"].shape[0]
    assert x_t.shape[0] == t.shape[0] == w.shape[0] == rows["caption"].shape[0] == 3 * b
    route = reference_route(5, 2.0)
    for row in range(3 * b):
        start = int(np.argmin(np.abs(route - float(t[row]))))
        assert start >= 1 and route[start] == pytest.approx(float(t[row]))
        one = {"caption": rows["caption"][row:row + 1], "caption_mask": rows["caption_mask"][row:row + 1]}
        np.testing.assert_array_equal(one["caption"][0], batch["caption"][row % b])
        teacher_fn = graphs.teacher_fn(state, one)

        def velocity(x, s, w_row=w[row:row + 1]):
            return SIGMA_DATA * classifier_free_guidance(*teacher_fn(x / SIGMA_DATA, s), w_row)

        np.testing.assert_allclose(velocity(x_t[row:row + 1], t[row:row + 1]), dxt_dt[row:row + 1], atol=1e-5)
        *_, end = teacher_trajectory(velocity, x_t[row:row + 1], route[start:])
        np.testing.assert_allclose(end[0], x0[row % b], atol=1e-4, err_msg=f"row {row}")


def test_an_update_trains_the_student_from_captions_alone(recipe_setup):
    recipe, state, batch, *_ = recipe_setup
    assert not recipe.needs_latents and recipe.trains == ("student",)
    new, metrics = jax.jit(lambda s, b: recipe.phase_update("generator", s, b, jax.random.key(0)))(state, batch)
    assert np.isfinite(float(metrics["generator/loss"])) and float(metrics["generator/grad_norm"]) > 0
    assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new.params["student"]),
                                                                   jax.tree.leaves(state.params["student"])))
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new.frozen["teacher"]),
                                                               jax.tree.leaves(state.frozen["teacher"])))


def test_train_command_runs_tbcm_on_a_prompts_only_dataset_and_resumes_its_replay_buffer(tmp_path):
    """`s2flash train` with recipe=tbcm reads captions only: a dataset without a single latent. The
    replay buffer is part of the checkpoint: a run stopped after 1 step and resumed equals an
    uninterrupted one bit for bit, buffer included."""
    data = write_tiny_dataset(tmp_path / "prompts", num_records=16, prompts_only=True)
    config = load_config("configs/tiny.py", [f"data.path={data}", "recipe=tbcm", "train.steps=2",
                                             "train.checkpoint_every=0", "tbcm.route_points=3",
                                             "tbcm.replay_size=24", "tbcm.replay_points=3"])
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    assert whole.step == 2 and np.isfinite(whole.history[-1]["generator/loss"])
    fresh = config.tbcm.points * config.train.batch_size
    assert [m["tbcm/replay_filled"] for m in whole.losses] == [fresh, min(2 * fresh, 24)]  # full at 24
    first = train(config, tmp_path / "split", record_losses=True, quiet=True, stop_after=1)
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert first.losses + rest.losses == whole.losses
    for (path, a), b in zip(jax.tree.leaves_with_path(whole.state), jax.tree.leaves(rest.state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    # The SANA-Sprint recipe needs latents, and says so.
    with pytest.raises(DataError, match="no latent"):
        train(dataclasses.replace(config, recipe="sana_sprint"), tmp_path / "run2", quiet=True)
    assert not (tmp_path / "run2").exists()


def replay_rows(ids, latent=(2, 2, 1), caption=(3, 4)):
    """Trajectory-point rows whose every field encodes its id, so a row can be traced through the buffer."""
    ids = jnp.asarray(ids, jnp.float32)
    fill = lambda shape: jnp.broadcast_to(ids.reshape((-1,) + (1,) * len(shape)), (len(ids), *shape))  # noqa: E731
    return {"x_t": fill(latent), "t": ids, "dxt_dt": -fill(latent), "w": ids + 0.5, "caption": fill(caption),
            "caption_mask": fill(caption[:1]).astype(jnp.int32)}


def test_replay_buffer_is_a_ring_that_overwrites_its_oldest_points_and_draws_only_filled_slots():
    buffer = empty_replay(5, (2, 2, 1), (3, 4))
    buffer = replay_write(buffer, replay_rows([0, 1, 2]))
    assert int(buffer["count"]) == 3 and int(buffer["next"]) == 3
    drawn = replay_draw(buffer, jax.random.key(0), 200)
    assert set(np.asarray(drawn["t"]).tolist()) == {0.0, 1.0, 2.0}  # uniform over the 3 filled slots
    for name, rows in drawn.items():  # each drawn row is one stored row, all of its fields together
        np.testing.assert_array_equal(rows, replay_rows(np.asarray(drawn["t"]))[name], err_msg=name)
    buffer = replay_write(buffer, replay_rows([3, 4, 5]))
    np.testing.assert_array_equal(buffer["t"], [5, 1, 2, 3, 4])  # id 0, the oldest, was overwritten
    assert int(buffer["count"]) == 5 and int(buffer["next"]) == 1
    assert set(np.asarray(replay_draw(buffer, jax.random.key(1), 200)["t"]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    with pytest.raises(ValueError, match="cannot hold one step's 6"):
        replay_write(buffer, replay_rows(range(6)))
    with pytest.raises(ValueError, match="caption rows have shape"):
        replay_write(buffer, replay_rows([0], caption=(2, 4)))
    with pytest.raises(ValueError, match="must be >= 0"):
        TBCMConfig(replay_size=-1)


def test_a_replaying_update_stores_this_steps_trajectory_points_and_trains_on_them_again(recipe_setup):
    """With replay on, the buffer after one update holds exactly the points trajectory_points made for
    it, and the loss is the sCM loss over those fresh points plus replay_points drawn from the buffer."""
    _, state, batch, graphs, config, shape = recipe_setup
    config = dataclasses.replace(config, replay_size=16, replay_points=5)
    student, teacher, _ = networks()
    recipe, state = tbcm(student, teacher, state.frozen["null_caption"], config, optax.adam(1e-3))
    key = jax.random.key(4)
    new, metrics = jax.jit(lambda s, b: recipe.phase_update("generator", s, b, key))(state, batch)
    points_key, replay_key = jax.random.split(key)
    x_t, t, dxt_dt, w, captions, _ = trajectory_points(graphs, state, batch, points_key, config, shape)
    n = x_t.shape[0]
    buffer = new.stats["tbcm_replay"]
    assert int(buffer["count"]) == n == int(metrics["tbcm/replay_filled"])
    fresh = {"x_t": x_t, "t": t, "dxt_dt": dxt_dt, "w": w, **captions}
    for name, rows in fresh.items():
        np.testing.assert_allclose(buffer[name][:n], rows, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(buffer[name][n:], 0, err_msg=name)
    replayed = replay_draw(buffer, replay_key, 5)
    rows = {k: jnp.concatenate([fresh[k], replayed[k].astype(fresh[k].dtype)]) for k in fresh}
    loss, _ = consistency_loss(graphs.student_fn(rows), state.params["student"], rows["x_t"], rows["t"],
                               rows["dxt_dt"], rows["w"], state.step, config.scm)
    np.testing.assert_allclose(metrics["generator/loss"], loss, rtol=1e-5)
    with pytest.raises(ValueError, match="replay_size=0 keeps none"):
        tbcm(student, teacher, state.frozen["null_caption"], dataclasses.replace(config, replay_size=0))
    fresh_only, _ = consistency_loss(graphs.student_fn(captions), state.params["student"], x_t, t, dxt_dt, w,
                                     state.step, config.scm)
    assert abs(float(fresh_only) - float(loss)) > 1e-6  # the replayed rows do enter the loss


def test_tbcm_distilled_mlp_samples_the_gaussian_in_1_2_and_4_steps():
    """Trained only on the analytic teacher's trajectories (9-point stratified routes, no data draws at
    all), a small MLP student samples the target in 1, 2 and 4 steps: mean within 0.1 standard
    deviations and standard deviation within 10 %, per dimension."""
    params, mlp = time_mlp(jax.random.key(0))
    config = SCMConfig(guidance_scales=(1.0,), tangent_warmup_steps=500)
    route = reference_route(9, 2.5)
    optimizer = optax.adam(1e-3)
    prompts = 128

    def student(p, x_hat, t, guidance):
        return mlp(p, x_hat, t), jnp.zeros(x_hat.shape[0])

    @jax.jit
    def train(params):
        def step(carry, i):
            params, opt_state = carry
            key = jax.random.fold_in(jax.random.key(1), i)
            times = route_times(key, route, "stratified")
            noise = SIGMA_DATA * jax.random.normal(jax.random.fold_in(key, 7), (prompts, 2))
            states, velocities, _ = teacher_trajectory(gaussian_velocity, noise, times)
            x_t, dxt_dt = states[1:].reshape(-1, 2), velocities[1:].reshape(-1, 2)
            t = jnp.repeat(times[1:], prompts)
            grads = jax.grad(lambda p: consistency_loss(student, p, x_t, t, dxt_dt, jnp.ones_like(t), i, config)[0])(
                params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(6000))[0][0]

    params = train(params)
    assert_consistency_samples_match(DATA, lambda x, t: mlp(params, x, t))


def test_config_is_validated():
    with pytest.raises(ValueError, match="route_strategy"):
        TBCMConfig(route_strategy="uniform")
    with pytest.raises(ValueError, match="points_per_trajectory"):
        TBCMConfig(route_points=4, points_per_trajectory=4)
    assert TBCMConfig(route_points=4).points == 3 and dataclasses.replace(TBCMConfig(), points_per_trajectory=2).points == 2
