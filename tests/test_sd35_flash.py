"""The SD3.5-Flash recipe on tiny SANA networks: what each phase trains, the student's inputs against its
own sampler, the real score's guidance against the fake score, and config validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2flash_jax.flows.trigflow import noised, scm_sample
from s2flash_jax.losses.dmd import distribution_matching, fake_score_loss, guided_x0, sample_times, x0_predictor
from s2flash_jax.recipes.sd35_flash import SD35FlashConfig, rollout_states, sd35_flash
from tests.test_sana_sprint import CAPTION, networks

BATCH = 4
CONFIG = SD35FlashConfig(steps=3, guidance_scale=3.0, fake_score_updates=2)


def build(config=CONFIG):
    student, teacher, _ = networks()
    channels = teacher.config.caption_channels
    null = jax.random.normal(jax.random.key(5), (CAPTION, channels))
    optimizers = {"student": optax.adam(1e-3), "fake_score": optax.adam(1e-3)}
    recipe, state = sd35_flash(student, teacher, null, config, shift=2.0, optimizers=optimizers)
    keys = jax.random.split(jax.random.key(6), 2)
    batch = {"caption": jax.random.normal(keys[0], (BATCH, CAPTION, channels)),
             "caption_mask": jnp.ones((BATCH, CAPTION), jnp.int32).at[::2, -1].set(0)}
    return recipe, state, batch


@pytest.fixture(scope="module")
def setup():
    return build()


def same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_recipe_trains_the_student_and_a_fake_score_started_from_the_teacher(setup):
    recipe, state, _ = setup
    assert recipe.trains == ("student", "fake_score") and recipe.product == "student"
    assert set(recipe.frozen) == {"teacher", "null_caption"} and not recipe.needs_latents
    assert [recipe.phase_at(i).name for i in range(6)] == ["generator", "fake_score", "fake_score"] * 2
    assert same(state.params["fake_score"], state.frozen["teacher"])
    fake, teacher = jax.tree.leaves(state.params["fake_score"]), jax.tree.leaves(state.frozen["teacher"])
    assert all(a is not b for a, b in zip(fake, teacher))  # a copy: training it leaves the teacher alone


def test_each_update_changes_only_the_network_it_trains(setup):
    recipe, state, batch = setup
    update = {name: jax.jit(functools.partial(recipe.phase_update, name)) for name in ("generator", "fake_score")}
    after_g, metrics = update["generator"](state, batch, jax.random.key(0))
    assert not same(after_g.params["student"], state.params["student"])
    assert same(after_g.params["fake_score"], state.params["fake_score"]) and same(after_g.frozen, state.frozen)
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["generator/grad_norm"]) > 0

    after_f, metrics = update["fake_score"](after_g, batch, jax.random.key(1))
    assert not same(after_f.params["fake_score"], after_g.params["fake_score"])
    assert same(after_f.params["student"], after_g.params["student"]) and same(after_f.frozen, state.frozen)
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["fake_score/grad_norm"]) > 0


def test_student_trains_on_the_states_its_own_sampler_visits(setup):
    """rollout_states with scm_sample's noise and key: the x̂0 of its last state is scm_sample's output;
    student_inputs hands each example the state of its own step k, at τ_k."""
    recipe, state, batch = setup
    nets = recipe.phases["generator"].loss.__self__
    params = state.params["student"]
    student_x0 = nets.student_x0(params, batch)
    noise = jax.random.normal(jax.random.key(2), (BATCH, *nets.latent_shape))
    states = rollout_states(student_x0, noise, jax.random.key(3), nets.schedule)
    assert states.shape == (3, BATCH, *nets.latent_shape)
    last = student_x0(states[-1], jnp.full((BATCH,), nets.schedule[-2]))
    w = jnp.full((BATCH,), CONFIG.guidance_scale)
    sampled = scm_sample(lambda x, t: nets.sprint.student_fn(batch)(params, x, t, w)[0], noise, jax.random.key(3),
                         nets.schedule)
    np.testing.assert_allclose(last, sampled, rtol=1e-4, atol=1e-5)

    k = jnp.array([0, 2, 1, 2])
    x_k, tau_k = nets.student_inputs(params, batch, k, jax.random.key(4))
    noise_key, sampler_key = jax.random.split(jax.random.key(4))
    states = rollout_states(student_x0, jax.random.normal(noise_key, noise.shape), sampler_key, nets.schedule)
    np.testing.assert_allclose(x_k, states[k, jnp.arange(BATCH)], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tau_k, np.float32(nets.schedule)[np.asarray(k)])


@pytest.mark.parametrize("mode", ["shared", "random"])
def test_each_loss_is_the_dmd_loss_on_the_students_sample_at_its_time(setup, mode):
    """Rebuilt from losses/dmd.py with the phase's own key splits: the generator's DM loss on the
    student's step-k sample against the guided teacher and the fake score, and the fake score's loss on
    the detached sample; at shared_times, or at random times in each loss's own flow-time range."""
    recipe, state, batch = setup
    config = dataclasses.replace(CONFIG, time_mode=mode, fake_score_flow_time_range=(0.3, 0.6))
    nets = dataclasses.replace(recipe.phases["generator"].loss.__self__, config=config)
    student, fake_params = state.params["student"], state.params["fake_score"]
    key = jax.random.key(7)
    time_key, sample_key, noise_key = jax.random.split(key, 3)

    k, t = sample_times(time_key, nets.schedule, BATCH, mode, config.dm_flow_time_range)
    x0_hat = nets.student_sample(student, batch, k, sample_key)
    real = guided_x0(nets.sprint.teacher_fn(state, batch), CONFIG.guidance_scale)
    fake = x0_predictor(nets.fake_score_fn(fake_params, batch))
    expected, _ = distribution_matching(x0_hat, noised(noise_key, x0_hat, t), t, real, fake)
    loss, (metrics, _) = nets.generator_loss(student, state, batch, key)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(metrics["sd35_flash/dm_time"]) == pytest.approx(float(jnp.mean(t)))

    k, t = sample_times(time_key, nets.schedule, BATCH, mode, config.fake_score_flow_time_range)
    x0_hat = nets.student_sample(student, batch, k, sample_key)
    expected, _ = fake_score_loss(nets.fake_score_fn(fake_params, batch), x0_hat, t, noise_key)
    loss, (metrics, _) = nets.fake_score_loss(fake_params, state, batch, key)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(metrics["sd35_flash/fake_score_time"]) == pytest.approx(float(jnp.mean(t)))


def test_dm_gradient_vanishes_when_the_fake_score_is_the_teacher_and_guidance_is_off(setup):
    """The fake score starts as the teacher: at guidance scale 1 the real score (guided teacher) equals
    it and the student gets no gradient; at scale 3 guidance alone makes one."""
    recipe, state, batch = setup
    nets = recipe.phases["generator"].loss.__self__
    grads = {}
    for scale in (1.0, 3.0):
        scaled = dataclasses.replace(nets, config=dataclasses.replace(CONFIG, guidance_scale=scale))
        grad = jax.jit(jax.grad(lambda p: scaled.generator_loss(p, state, batch, jax.random.key(8))[0]))(
            state.params["student"])
        grads[scale] = float(optax.tree.norm(grad))
    assert grads[3.0] > 0 and grads[1.0] < 1e-3 * grads[3.0], grads


@pytest.mark.parametrize("bad, key", [
    ({"steps": 0}, "steps"),
    ({"time_mode": "uniform"}, "time_mode"),
    ({"steps": 1, "time_mode": "shared"}, "time_mode='shared'"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"fake_score_updates": 0}, "fake_score_updates"),
    ({"dm_flow_time_range": (0.5, 0.2)}, "dm_flow_time_range"),
    ({"fake_score_flow_time_range": (0.0, 1.5)}, "fake_score_flow_time_range"),
])
def test_config_is_validated_with_one_error_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=f"sd35_flash.{key}"):
        SD35FlashConfig(**bad)
    assert SD35FlashConfig(steps=1, time_mode="random").cycle == ("generator",) + ("fake_score",) * 5


def test_train_command_runs_sd35_flash_on_captions_and_resumes_bit_for_bit(tmp_path):
    """`s2flash train --config configs/tiny.py:sd35_flash` through the engine: generator and fake-score
    updates alternate, both networks train, the teacher does not, and a run stopped after 2 updates
    and resumed equals an uninterrupted one (fake score and its optimizer state included)."""
    from s2flash_jax.config import load_config
    from s2flash_jax.parallel.mesh import make_mesh
    from s2flash_jax.train.loop import train
    from s2flash_jax.train.state import create_train_state
    from tests.test_student_init import random_checkpoint
    from tests.test_train import assert_states_equal
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", num_records=32)
    teacher = random_checkpoint(tmp_path / "teacher", load_config("configs/tiny.py:sd35_flash").teacher, seed=2)
    overrides = [f"data.path={data}", f"train.teacher_checkpoint={teacher}", "train.steps=4", "train.log_every=0",
                 "train.checkpoint_every=2"]
    config = load_config("configs/tiny.py:sd35_flash", overrides)
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    assert [("generator/loss" in m, "fake_score/loss" in m) for m in whole.losses] == [(True, False), (False, True)] * 2
    assert all(np.isfinite(v) for m in whole.losses for v in m.values())
    train(config, tmp_path / "split", quiet=True, stop_after=2)
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert rest.losses == whole.losses[2:]
    assert_states_equal(rest.state, whole.state)

    _, initial, _ = create_train_state(config, make_mesh(config.mesh))
    final = whole.state.distill
    for name in ("student", "fake_score"):
        assert not same(final.params[name], initial.distill.params[name]), name
    assert_states_equal(final.frozen, initial.distill.frozen)


def test_the_demo_samples_the_shapes_student_at_its_own_step_count_from_captions_alone():
    from s2flash_jax.config import load_config
    from s2flash_jax.demo import RECIPES
    from tests.conftest import REPO

    entry = RECIPES["sd35-flash"]
    config = load_config(f"{REPO}/configs/shapes.py:{entry.variant}")
    assert config.recipe == "sd35_flash" and entry.steps == (config.sd35_flash.steps,) and entry.prompts_only
    assert config.sample.guidance_scale == config.sd35_flash.guidance_scale  # sampled as it was trained
