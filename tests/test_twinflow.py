"""TwinFlow: the twin time conditioning of the SANA model, the any-step sampler, each loss term on the
analytic Gaussian (whose any-step flow is known exactly), and the recipe through the engine."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conversion.errors import ConversionError
from conversion.exporter import export_checkpoint
from s2flash_jax.config import load_config
from s2flash_jax.flows.twinflow import any_step_sample, data_and_noise, sampling_times
from s2flash_jax.losses.twinflow import (
    TwinFlowConfig, group_rows, jump_weight, rcgm_target, robust_loss, twinflow_loss, velocity_mismatch)
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.twinflow import next_target
from s2flash_jax.sampling import few_step_sample
from s2flash_jax.train.loop import train
from s2flash_jax.recipes.common import copy_shared
from tests.gaussian import AnyStepGaussian
from tests.test_train import assert_states_equal
from tests.tiny_data import write_tiny_dataset

DATA = AnyStepGaussian(jnp.array([0.8, -0.4]), jnp.array([0.3, 1.2]))


def exact_twin(real: AnyStepGaussian, fake: AnyStepGaussian):
    """F of an ideal TwinFlow model: the data's average velocity at positive times, the generated
    distribution's on the twin (negative-time) branch."""

    def fn(x, s, r):
        pos, neg = real.average_velocity(x, jnp.abs(s), jnp.abs(r)), fake.average_velocity(x, jnp.abs(s), jnp.abs(r))
        return jnp.where((s < 0)[:, None], neg, pos)

    return fn


def test_twin_embeddings_leave_the_flow_model_unchanged_until_they_train():
    """A twinflow_embeds SANA holding a flow model's weights is that flow model at r = s, on both
    branches; the target-time embedding acts only on jumps (r < s) and the sign embedding only on
    negative times."""
    flow_config = load_config("configs/tiny.py:teacher").model
    flow = SanaTransformer(flow_config, rngs=nnx.Rngs(0))
    flow.proj_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(3), flow.proj_out.kernel.shape)  # not 0
    twin = SanaTransformer(dataclasses.replace(flow_config, twinflow_embeds=True), rngs=nnx.Rngs(1))
    nnx.update(twin, copy_shared(nnx.state(flow), nnx.state(twin)))
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (4, 8, 8, 4))
    caption = jax.random.normal(keys[1], (4, 8, 32))
    s = jnp.array([0.9, 0.6, 0.3, 0.1])
    r = jnp.array([0.0, 0.2, 0.1, 0.05])
    reference = flow(x, s, caption)
    np.testing.assert_allclose(twin(x, s, caption, target_s=s), reference, atol=1e-6)
    np.testing.assert_allclose(twin(x, -s, caption, target_s=-s), reference, atol=1e-6)
    jump = twin(x, s, caption, target_s=r)
    assert np.all(np.abs(np.asarray(jump - reference)).reshape(4, -1).max(axis=1) > 1e-3)

    twin.twin_time_embed.negative_time[...] = jax.random.normal(keys[2], (flow_config.inner_dim,))
    signed = jnp.array([1.0, -1.0, 1.0, -1.0])
    out = np.asarray(twin(x, signed * s, caption, target_s=signed * s))
    np.testing.assert_allclose(out[::2], np.asarray(reference)[::2], atol=1e-6)
    assert np.all(np.abs(out[1::2] - np.asarray(reference)[1::2]).reshape(2, -1).max(axis=1) > 1e-3)
    with pytest.raises(ValueError, match="target_s"):
        twin(x, s, caption)
    with pytest.raises(ValueError, match="target_s"):
        flow(x, s, caption, target_s=s)


def test_sampling_times_are_the_released_grid():
    """u = linspace(0.001, 1 − last, n), s = 1 − u, then 0; a shift warps them as the flow schedule does."""
    np.testing.assert_allclose(sampling_times(1), [0.999, 0.0], atol=1e-7)
    for steps, last in ((2, 0.6), (4, 0.5)):
        released = np.append(1.0 - np.linspace(0.001, 1.0 - last, steps), 0.0)
        np.testing.assert_allclose(sampling_times(steps, last), released, atol=1e-6)
    shifted = np.asarray(sampling_times(4, 0.5, shift=3.0))[:-1]
    plain = np.asarray(sampling_times(4, 0.5))[:-1]
    np.testing.assert_allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-6)
    with pytest.raises(ValueError, match="last_time"):
        sampling_times(2, last_time=1.0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_exact_average_velocity_samples_the_target_in_any_number_of_steps(steps):
    noise = jax.random.normal(jax.random.key(0), (40000, 2))
    fn = exact_twin(DATA, DATA)
    x = np.asarray(any_step_sample(fn, noise, jax.random.key(1), sampling_times(steps)))
    np.testing.assert_allclose(x.mean(0), DATA.mu, atol=0.02)
    np.testing.assert_allclose(x.std(0), DATA.sigma, rtol=0.02)
    x_hat, z_hat = data_and_noise(noise, jnp.full((40000,), -0.999), fn(noise, jnp.ones(40000), jnp.zeros(40000)))
    np.testing.assert_allclose(0.999 * z_hat + 0.001 * x_hat, noise, atol=1e-5)  # |s| reconstructs the line


@pytest.mark.parametrize("s, r", [(1.0, 0.0), (0.7, 0.3), (0.5, 0.48), (0.3, 0.295)])
def test_rcgm_target_is_centred_on_the_exact_average_velocity_and_pulls_towards_it(s, r):
    """For one x_s, with (x̂0, z) drawn from their posterior, the RCGM target of the exact average
    velocity averages to itself (its residual is zero-mean and symmetric, so the clip keeps it
    centred); for a perturbed F it points back towards the exact one. The last case is within the
    finite-difference step of r, where the target is the plain flow-matching one."""
    n, rcgm = 40000, TwinFlowConfig()
    for x_s in (jnp.array([0.5, -1.0]), jnp.array([-0.2, 1.5])):
        x0, z = DATA.posterior(jax.random.key(0), x_s, s, n)
        xs = jnp.broadcast_to(x_s, (n, 2))
        ss, rr = jnp.full((n,), s), jnp.full((n,), r)
        exact = DATA.average_velocity(xs, ss, rr)
        for offset in (0.0, 0.2, -0.2):
            velocity = exact + offset
            target = rcgm_target(lambda x, a, b: DATA.average_velocity(x, a, b), velocity, z - x0, xs, ss, rr,
                                 rcgm.estimate_order, rcgm.rcgm_step)
            mean = np.asarray(target.mean(0))
            if offset == 0.0:
                np.testing.assert_allclose(mean, exact[0], atol=0.03, err_msg=f"x_s={x_s}")
            else:
                assert np.all(np.sign(mean - np.asarray(velocity[0])) == -np.sign(offset)), (x_s, offset, mean)


def test_rectification_vanishes_at_the_data_and_trains_a_generator_to_its_moments():
    """With exact real and fake velocities, the velocity mismatch is zero when the one-step generator
    samples the data; otherwise its rectification loss alone drives a linear generator
    x = a + b·z to the data's mean and standard deviation."""
    config = dataclasses.replace(TwinFlowConfig(), loss="l2")
    z = jax.random.normal(jax.random.key(0), (4096, 2))
    same = velocity_mismatch(exact_twin(DATA, DATA), DATA.mu + DATA.sigma * z, jax.random.key(1))
    assert float(jnp.max(jnp.abs(same))) < 1e-5

    def loss(params, key):
        a, b = params
        fake = AnyStepGaussian(jax.lax.stop_gradient(a), jax.lax.stop_gradient(jnp.abs(b)))
        velocity = z - (a + b * z)  # F(z, 1, 0) of the generator, x̂ = z − F
        mismatch = velocity_mismatch(exact_twin(DATA, fake), jax.lax.stop_gradient(z - velocity), key)
        return robust_loss(velocity, jax.lax.stop_gradient(velocity - mismatch), config).mean()

    params = (jnp.array([-1.0, 1.0]), jnp.array([1.0, 0.5]))
    optimizer = optax.sgd(0.5)

    @jax.jit
    def fit(params):
        def step(carry, i):
            params, opt = carry
            grads = jax.grad(loss)(params, jax.random.key(i))
            updates, opt = optimizer.update(grads, opt)
            return (optax.apply_updates(params, updates), opt), None

        return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(1500))[0][0]

    a, b = fit(params)
    np.testing.assert_allclose(a, DATA.mu, atol=0.05)
    np.testing.assert_allclose(jnp.abs(b), DATA.sigma, rtol=0.08)


def test_each_row_group_gets_its_times_inputs_and_targets():
    """Read off the calls the loss makes, with a model whose one-step sample is the constant c: e2e
    rows jump from pure noise (s = 1, r = 0); mul rows keep r within 5 % of s; any rows r in [0, s];
    adv rows run the twin branch (s = r < 0) on the model's own samples, not the data; every group's
    loss is the weighted mean of its rows' errors against z − x, and the loss their mean."""
    calls, c = [], 0.25

    def model(params, x_s, s, r, conditional):
        calls.append((x_s, s, r, conditional))
        return params * (x_s - c)  # x̂ = x_s − |s|·F: exactly c from pure noise

    config = TwinFlowConfig(guidance_ratio=0.0, estimate_order=0, loss="l2")
    x = DATA.mu + DATA.sigma * jax.random.normal(jax.random.key(0), (16, 2))
    loss, metrics = twinflow_loss(model, jnp.ones(()), None, x, jax.random.key(1), config)
    rows = group_rows(16, config.group_weights)
    assert [int(m.sum()) for m in rows.values()] == [4, 4, 4, 4]
    assert np.all(np.asarray(calls[0][1]) == 1.0) and np.all(np.asarray(calls[0][2]) == 0.0)
    x_s, s, r, conditional = (np.asarray(v) for v in calls[1])
    assert conditional
    e2e, mul, any_, adv = (rows[g] for g in ("e2e", "mul", "any", "adv"))
    assert np.all(s[e2e] == 1.0) and np.all(r[e2e] == 0.0)
    assert np.all((r[mul] <= s[mul]) & (r[mul] >= 0.95 * s[mul]))
    assert np.all((r[any_] <= s[any_]) & (r[any_] >= 0.0) & (s[any_] > 0))
    assert np.all(s[adv] < 0) and np.all(s[adv] == r[adv])
    for group, m in rows.items():
        data = c if group == "adv" else np.asarray(x)[m]
        size = np.abs(s[m])[:, None]
        noise = (x_s[m] - (1 - size) * data) / size  # x_s = |s|·z + (1 − |s|)·x on each row's line
        weight = 1.0 if group == "adv" else np.asarray(jump_weight(jnp.asarray(s[m]), jnp.asarray(r[m])))
        expected = np.mean(weight * np.mean((x_s[m] - c - (noise - data)) ** 2, axis=1))
        np.testing.assert_allclose(metrics[f"twinflow/{group}"], expected, rtol=1e-4, err_msg=group)
    np.testing.assert_allclose(jump_weight(jnp.ones(1), jnp.zeros(1)), [1.0], atol=1e-6)
    np.testing.assert_allclose(jump_weight(jnp.full((1,), 0.5), jnp.full((1,), 0.5)), [math.tan(math.pi / 2.5) + 1])
    assert float(metrics["twinflow/rectify"]) == 0.0  # both branches of this model agree everywhere
    np.testing.assert_allclose(loss, np.mean([float(metrics[f"twinflow/{g}"]) for g in rows]), rtol=1e-5)


def test_robust_loss_is_barrons_with_a_detached_weight():
    pred, target = jnp.array([[0.3, -0.1], [2.0, 1.0]]), jnp.zeros((2, 2))
    config = TwinFlowConfig()
    c = config.barron_c
    mse = jnp.mean(pred**2, axis=1)
    np.testing.assert_allclose(robust_loss(pred, target, config), mse / c / jnp.sqrt(mse / (c**2 + 1e-8) + 1),
                               rtol=1e-5)
    grad = jax.grad(lambda p: robust_loss(p, target, config).sum())(pred)
    weight = 1 / jnp.sqrt(mse / (c**2 + 1e-8) + 1) / c
    np.testing.assert_allclose(grad, weight[:, None] * pred, rtol=1e-5)  # d mse / d pred = 2·pred / 2


def test_target_network_warms_up_from_the_online_model():
    params, config = {"w": jnp.ones(3)}, TwinFlowConfig(target_ema_decay=0.99)
    target = {"params": {"w": jnp.zeros(3)}, "decay": jnp.zeros(())}
    decays = []
    for step in range(4):
        target = next_target(target, jax.tree.map(lambda p: p * (step + 1), params), config)
        decays.append(float(target["decay"]))
        if step == 0:  # decay 0 at the first step: the target is the model itself
            np.testing.assert_allclose(target["params"]["w"], 1.0)
    d = 0.0
    for got in decays:
        d = d + (1 - d) * (0.99 - d) / 2
        assert got == pytest.approx(d, rel=1e-6)
    frozen = next_target(target, params, dataclasses.replace(config, target_ema_decay=1.0))
    assert frozen is target


def test_config_is_validated():
    for bad in (dict(group_weights=(1, 1, 1)), dict(consistency_ratio=1.5), dict(loss="l1"), dict(time_beta=(1, 0, 1))):
        with pytest.raises(ValueError, match="twinflow"):
            TwinFlowConfig(**bad)
    with pytest.raises(ValueError, match="cannot be split"):
        group_rows(3, (1, 1, 0, 0))


def test_twinflow_trains_through_the_engine_and_resumes_exactly(tmp_path):
    """`s2flash train` with recipe=twinflow: the EMA target network is part of the checkpoint, so a run
    resumed half-way ends bit-identical to an uninterrupted one; a TwinFlow student samples."""
    data = write_tiny_dataset(tmp_path / "data", num_records=32)
    config = load_config("configs/tiny.py:twinflow", [f"data.path={data}", "train.steps=4", "train.log_every=0",
                                                      "train.checkpoint_every=2", "train.ema_decay=0.9"])
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    first = train(config, tmp_path / "split", record_losses=True, quiet=True, stop_after=2)
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert first.losses + rest.losses == whole.losses
    assert_states_equal(rest.state, whole.state)
    target = whole.state.distill.stats["twinflow_target"]
    assert 0.5 < float(target["decay"]) < 0.99
    assert "teacher" not in whole.state.distill.frozen  # no teacher is kept
    model = SanaTransformer(config.model, rngs=nnx.Rngs(0))
    nnx.update(model, whole.state.distill.params["student"])
    caption = jnp.zeros((2, 8, 32))
    for steps in (1, 2):
        out = few_step_sample(model, jnp.ones((2, 8, 8, 4)), caption, None, jax.random.key(0), steps=steps,
                              guidance_scale=1.0)
        assert out.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(out)))
    # diffusers' transformer has no target-time or sign embedding: export says so and writes nothing.
    ckpt = whole.export(config, tmp_path / "model")
    with pytest.raises(ConversionError, match="TwinFlow student"):
        export_checkpoint(ckpt, tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()
