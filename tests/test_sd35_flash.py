"""The SD3.5-Flash recipe on tiny SANA networks: what each phase trains, the student's inputs against its
own sampler, the real score's guidance against the fake score, and config validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2flash_jax.flows.trigflow import SIGMA_DATA, noised, scm_sample
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
    ({"adversarial_weight": -1.0}, "adversarial_weight"),
    ({"adversarial_from": -1}, "adversarial_from"),
    ({"adversarial_weight": 1.0, "discriminator_refresh_every": -5}, "discriminator_refresh_every"),
    ({"adversarial_weight": 1.0, "gan_loss": "wasserstein"}, "gan_loss"),
    ({"adversarial_weight": 1.0, "block_ids": (1, 1)}, "block_ids"),
    ({"step_range": (2, 2)}, "step_range"),
    ({"steps": 4, "step_range": (0, 5)}, "step_range"),
    ({"step_range": (1,)}, "step_range"),
])
def test_config_is_validated_with_one_error_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=f"sd35_flash.{key}"):
        SD35FlashConfig(**bad)
    assert SD35FlashConfig(steps=1, time_mode="random").cycle == ("generator",) + ("fake_score",) * 5
    # without an adversary its stage and refresh settings are ignored: one stage, no discriminator
    quiet = SD35FlashConfig(adversarial_from=10, discriminator_refresh_every=5)
    assert quiet.stages == () and "discriminator" not in quiet.cycle


def _engine_setup(tmp_path, *overrides):
    from s2flash_jax.config import load_config
    from tests.test_student_init import random_checkpoint
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", num_records=32)
    teacher = random_checkpoint(tmp_path / "teacher", load_config("configs/tiny.py:sd35_flash").teacher, seed=2)
    return load_config("configs/tiny.py:sd35_flash", [
        f"data.path={data}", f"train.teacher_checkpoint={teacher}", "train.log_every=0", *overrides])


def test_two_stage_run_with_a_refreshed_adversary_resumes_bit_for_bit(tmp_path):
    """Stage 1 (generator, fake score) for 2 steps, then stage 2 with the discriminator, whose heads
    restart at its second update; a run stopped in stage 2 before that restart and resumed equals an
    uninterrupted one: student, fake score, discriminator and all three optimizer states. Captions-only
    training (no adversary) is the same engine path without the discriminator phase."""
    from s2flash_jax.parallel.mesh import make_mesh
    from s2flash_jax.train.loop import train
    from s2flash_jax.train.state import create_train_state
    from tests.test_train import assert_states_equal

    config = _engine_setup(tmp_path, "train.steps=8", "train.checkpoint_every=5", "sd35_flash.adversarial_weight=0.1",
                           "sd35_flash.adversarial_from=2", "sd35_flash.discriminator_refresh_every=1")
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    phases = [next(p for p in ("generator", "fake_score", "discriminator") if f"{p}/loss" in m) for m in whole.losses]
    assert phases == ["generator", "fake_score"] + ["generator", "fake_score", "discriminator"] * 2
    assert [m["sd35_flash/stage"] for m in whole.losses if "generator/loss" in m] == [1.0, 2.0, 2.0]
    assert all(np.isfinite(v) for m in whole.losses for v in m.values())
    train(config, tmp_path / "split", quiet=True, stop_after=5)
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert rest.losses == whole.losses[5:]
    assert_states_equal(rest.state, whole.state)

    _, initial, _ = create_train_state(config, make_mesh(config.mesh))
    for name in ("student", "fake_score", "discriminator"):
        assert not same(whole.state.distill.params[name], initial.distill.params[name]), name
    assert_states_equal(whole.state.distill.frozen, initial.distill.frozen)  # the teacher does not train


def test_the_demo_samples_the_shapes_student_at_its_own_step_count_from_captions_alone():
    from s2flash_jax.config import load_config
    from s2flash_jax.demo import RECIPES
    from tests.conftest import REPO

    entry = RECIPES["sd35-flash"]
    config = load_config(f"{REPO}/configs/shapes.py:{entry.variant}")
    assert config.recipe == "sd35_flash" and entry.steps == (config.sd35_flash.steps,)
    assert entry.prompts_only == (not config.sd35_flash.adversarial)  # the adversary needs real latents
    assert config.sample.guidance_scale == config.sd35_flash.guidance_scale  # sampled as it was trained


ADVERSARIAL = dataclasses.replace(CONFIG, adversarial_weight=0.5, adversarial_from=3, block_ids=(0, 1),
                                  discriminator_refresh_every=2)


def build_adversarial(config=ADVERSARIAL):
    from flax import nnx

    from s2flash_jax.recipes.common import conv_discriminator_for

    student, teacher, _ = networks()
    channels, size = teacher.config.caption_channels, teacher.config.sample_size
    null = jax.random.normal(jax.random.key(5), (CAPTION, channels))
    heads = conv_discriminator_for(teacher.config, config, rngs=nnx.Rngs(9))
    optimizers = {name: optax.adam(1e-3) for name in ("student", "fake_score", "discriminator")}
    recipe, state = sd35_flash(student, teacher, null, config, shift=2.0, discriminator=heads, optimizers=optimizers)
    keys = jax.random.split(jax.random.key(6), 3)
    batch = {"caption": jax.random.normal(keys[0], (BATCH, CAPTION, channels)),
             "caption_mask": jnp.ones((BATCH, CAPTION), jnp.int32).at[::2, -1].set(0),
             "latents": jax.random.normal(keys[1], (BATCH, size, size, teacher.config.in_channels))}
    return recipe, state, batch


@pytest.fixture(scope="module")
def adversarial():
    return build_adversarial()


def test_the_adversary_joins_in_stage_two_and_schedules_count_its_updates(adversarial):
    from s2flash_jax.recipes.base import phase_count

    recipe, state, _ = adversarial
    assert recipe.trains == ("student", "fake_score", "discriminator") and recipe.needs_latents
    g, f, d = "generator", "fake_score", "discriminator"
    assert [recipe.phase_at(i).name for i in range(11)] == [g, f, f] + [g, f, f, d] * 2
    for steps in (3, 7, 11):  # whole cycles: the count is exact
        for phase in (g, f, d):
            assert phase_count(steps, recipe.cycle, phase, recipe.stages) == \
                [recipe.phase_at(i).name for i in range(steps)].count(phase), (steps, phase)
    with pytest.raises(ValueError, match="sd35_flash.adversarial_weight > 0 needs discriminator heads"):
        student, teacher, _ = networks()
        sd35_flash(student, teacher, state.frozen["null_caption"], ADVERSARIAL)
    for stages, message in ((((0, (g,)),), "increasing global steps > 0"), (((5, ("critic",)),), "cycle")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(recipe, stages=stages)


def test_the_adversary_moves_the_student_only_in_stage_two(adversarial):
    """At guidance 1 the fake score (a copy of the teacher) equals the real score, so the DM term gives
    no gradient: in stage 1 the student gets none, in stage 2 the adversarial term gives one."""
    recipe, state, batch = adversarial
    nets = recipe.phases["generator"].loss.__self__
    scaled = dataclasses.replace(nets, config=dataclasses.replace(ADVERSARIAL, guidance_scale=1.0))
    grads, stages = {}, {}
    for step in (0, ADVERSARIAL.adversarial_from):
        at = state.replace(step=jnp.int32(step))

        def loss(p, at=at):
            return scaled.generator_loss(p, at, batch, jax.random.key(8))

        grad, (metrics, _) = jax.jit(jax.grad(loss, has_aux=True))(state.params["student"])
        grads[step], stages[step] = float(optax.tree.norm(grad)), float(metrics["sd35_flash/stage"])
    assert stages == {0: 1.0, 3: 2.0}
    assert grads[3] > 0 and grads[0] < 1e-3 * grads[3], grads


def test_intermediate_pairs_share_their_noise_at_the_next_trajectory_time(adversarial):
    """Real and fake re-noised with one noise draw: equal clean latents give equal features. After the
    last step the state is the clean sample itself (τ_N = 0); after step 0 it is x̂0 noised to τ_1."""
    from s2flash_jax.recipes.common import teacher_block_features

    recipe, state, batch = adversarial
    nets = recipe.phases["generator"].loss.__self__
    x0 = batch["latents"] * SIGMA_DATA
    real, fake = nets.intermediate_features(state, batch, x0, jnp.array([0, 1, 2, 0]), jax.random.key(3))
    for r, f in zip(real, fake, strict=True):
        np.testing.assert_array_equal(r, f)

    x0_hat = x0 + 0.3 * jax.random.normal(jax.random.key(4), x0.shape)
    features = functools.partial(teacher_block_features, nets.sprint, state, caption=batch["caption"],
                                 caption_mask=batch["caption_mask"], block_ids=ADVERSARIAL.block_ids)
    for k, t in ((2, 0.0), (0, nets.schedule[1])):
        steps = jnp.full((BATCH,), k)
        _, fake = nets.intermediate_features(state, batch, x0_hat, steps, jax.random.key(5))
        times = jnp.full((BATCH,), t, jnp.float32)
        expected = features(x_hat=noised(jax.random.key(5), x0_hat, times) / SIGMA_DATA, t=times)
        for a, b in zip(fake, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_refresh_restarts_the_heads_and_their_optimizer_on_schedule(adversarial):
    """Discriminator updates in stage 2 fall on steps 6, 10, 14 (cycle g, f, f, d from step 3); with
    refresh every 2 the update at step 14 starts from fresh heads and a fresh optimizer state, the
    one at step 10 does not: each equals a recipe without refresh run from the state it should see."""
    recipe, state, batch = adversarial
    plain, _, _ = build_adversarial(dataclasses.replace(ADVERSARIAL, discriminator_refresh_every=0))
    nets = recipe.phases["discriminator"].loss.__self__
    trained, _ = jax.jit(functools.partial(recipe.phase_update, "discriminator"))(
        state.replace(step=jnp.int32(6)), batch, jax.random.key(0))  # heads and optimizer away from init
    update = jax.jit(functools.partial(recipe.phase_update, "discriminator"))
    plain_update = jax.jit(functools.partial(plain.phase_update, "discriminator"))
    key = jax.random.key(11)
    restart_key, loss_key = jax.random.split(key)
    for step, due in ((10, False), (14, True)):
        at = trained.replace(step=jnp.int32(step))
        after, _ = update(at, batch, key)
        if due:
            fresh = nets.fresh_discriminator(restart_key)
            assert not same(fresh, state.params["discriminator"])  # random, not the first initialisation
            at = at.replace(params={**at.params, "discriminator": fresh},
                            opt_state={**at.opt_state, "discriminator": optax.adam(1e-3).init(fresh)})
        expected, _ = plain_update(at, batch, loss_key)
        for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                        jax.tree.leaves((expected.params, expected.opt_state)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_split_timestep_branch_trains_only_its_own_steps(setup):
    """step_range (1, 3) of a 3-step student draws steps 1 and 2 only, whose shared DM time is τ_2;
    (0, 1) draws step 0, at τ_1."""
    from s2flash_jax.losses.dmd import dm_time_for_steps, student_steps

    recipe, state, batch = setup
    nets = recipe.phases["generator"].loss.__self__
    k = student_steps(jax.random.key(0), nets.schedule, 512, (1, 2))
    assert set(np.asarray(k).tolist()) == {1, 2}
    dm_times = dm_time_for_steps(nets.schedule)
    for step_range, time in (((1, 3), dm_times[2]), ((0, 1), dm_times[0])):
        branch = dataclasses.replace(nets, config=dataclasses.replace(CONFIG, step_range=step_range))
        _, (metrics, _) = branch.generator_loss(state.params["student"], state, batch, jax.random.key(1))
        assert float(metrics["sd35_flash/dm_time"]) == pytest.approx(float(time), rel=1e-6)
