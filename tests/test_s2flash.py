"""The S2-Flash recipe: each loss term on spy networks (analytic student, teacher features that are the
latent tokens), its times against the sampler's, lazy R1 against losses/r1.py, the unconditional
stage, config validation, and `s2flash train` on the tiny config resuming bit for bit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.cli import main
from s2flash_jax.config import ConfigError, load_config
from s2flash_jax.flows import trigflow
from s2flash_jax.flows.trigflow import MAX_TIME, SIGMA_DATA
from s2flash_jax.losses.adversarial import GAN_LOSSES
from s2flash_jax.losses.r1 import r1_penalty
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.models.discriminator import ConvDiscriminatorHeads
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.recipes.base import DistillState
from s2flash_jax.recipes.common import phase_updates_before, step_schedule
from s2flash_jax.recipes.s2flash import S2FlashConfig, S2FlashNetworks, uniform_times
from s2flash_jax.sampling import few_step_sample
from s2flash_jax.train.loop import train
from s2flash_jax.train.state import create_train_state, initialiser
from tests.conftest import REPO
from tests.test_train import assert_states_equal
from tests.tiny_data import write_tiny_dataset

BATCH, SIZE, CHANNELS, CAPTION = 8, 4, 8, 3
CONFIG = S2FlashConfig(steps=4, block_ids=(0, 1), r1_every=3, scm=SCMConfig(guidance_scales=(2.0, 4.0)))


class SpyTeacher:
    """Block features that are the flow-scale latent tokens [B, N, C], scaled per block and by the time,
    plus the caption's mean token: they see the input, its time and its caption."""

    def block_features(self, x_flow, s, caption, caption_mask, *, block_ids):
        tokens = x_flow.reshape(x_flow.shape[0], -1, x_flow.shape[-1])
        context = jnp.mean(caption * caption_mask[..., None], axis=1)[:, None, :]
        return [(1 + i) * (1 + s[:, None, None]) * tokens + context for i in block_ids]


@dataclasses.dataclass(frozen=True)
class SpySprint:
    """TrigFlowNetworks' interface on analytic functions: the student F = scale·x̂ + shift (logvar 0), the
    teacher's conditional / unconditional F = ±x̂ (recording the times it is asked at when run eagerly)."""

    teacher_times: list = dataclasses.field(default_factory=list)

    def student_fn(self, batch):
        return lambda params, x_hat, t, w: (params["scale"] * x_hat + params["shift"], jnp.zeros(x_hat.shape[0]))

    def teacher_fn(self, state, batch):
        def teacher(x_hat, t):
            self.teacher_times.append(np.asarray(t))
            return -x_hat, x_hat

        return teacher

    def frozen_teacher(self, state):
        return SpyTeacher()


def spy_setup(config=CONFIG, shift=2.0, step=0):
    heads = ConvDiscriminatorHeads(CHANNELS, len(config.block_ids), (SIZE, SIZE), rngs=nnx.Rngs(0))
    graph, head_params = nnx.split(heads, nnx.Param)
    nets = S2FlashNetworks(SpySprint(), graph, config, step_schedule(config.steps, shift))
    keys = jax.random.split(jax.random.key(1), 3)
    null = jax.random.normal(keys[2], (CAPTION, CHANNELS))
    state = DistillState(step=jnp.int32(step),
                         params={"student": {"scale": jnp.float32(0.3), "shift": jnp.float32(0.1)},
                                 "discriminator": head_params},
                         frozen={"teacher": {}, "null_caption": null, "null_caption_mask": None},
                         stats={}, opt_state={})
    batch = {"latents": jax.random.normal(keys[0], (BATCH, SIZE, SIZE, CHANNELS)),
             "caption": jax.random.normal(keys[1], (BATCH, CAPTION, CHANNELS)),
             "caption_mask": jnp.ones((BATCH, CAPTION), jnp.int32).at[::2, -1].set(0)}
    return nets, state, batch


def test_gan_losses_are_the_softplus_and_hinge_formulas():
    real, fake = jnp.array([[0.0], [2.0]]), jnp.array([[0.0], [-1.0]])
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    ns = GAN_LOSSES["non_saturating"]
    np.testing.assert_allclose(ns.generator(fake), (softplus(0.0) + softplus(1.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(ns.discriminator(real, fake),
                               (softplus(0.0) + softplus(-2.0)) / 2 + (softplus(0.0) + softplus(-1.0)) / 2, rtol=1e-6)
    hinge = GAN_LOSSES["hinge"]
    np.testing.assert_allclose(hinge.generator(fake), 0.5, rtol=1e-6)
    np.testing.assert_allclose(hinge.discriminator(real, fake), 0.5 * ((1 + 0) / 2 + (1 + 0) / 2), rtol=1e-6)


def test_student_inputs_come_from_the_step_set_and_step_0_is_pure_noise():
    nets, _, _ = spy_setup()
    x0 = SIGMA_DATA * jax.random.normal(jax.random.key(0), (512, 2, 2, 1))
    x_t, t, k = nets.student_inputs(jax.random.key(3), x0)
    other, _, _ = nets.student_inputs(jax.random.key(3), 3.0 * x0 + 1.0)  # same noise, other data
    steps = np.asarray(nets.schedule[:-1], np.float32)
    assert len(steps) == CONFIG.steps and steps[0] == np.float32(MAX_TIME)
    assert set(np.asarray(k).tolist()) == set(range(CONFIG.steps))
    np.testing.assert_array_equal(t, steps[np.asarray(k)])
    first = np.asarray(k) == 0
    np.testing.assert_array_equal(x_t[first], other[first])  # no trace of the data at pure noise
    np.testing.assert_allclose(np.std(x_t[first]), SIGMA_DATA, rtol=0.1)
    # Elsewhere the data enters with weight cos τ_k, as trigflow.noised forward-noises it.
    later = ~first
    cos = np.cos(np.asarray(t)[later])[:, None, None, None]
    np.testing.assert_allclose(other[later] - x_t[later], cos * (2.0 * x0[later] + 1.0), atol=1e-5)


def test_discriminator_pairs_share_their_time_and_noise():
    """A student whose x̂0 is 0 makes the fake input pure noise scaled by sin t_D; the real input of the
    pair differs from it by cos t_D·x0 alone, so time and noise are the same for both."""
    nets, _, batch = spy_setup()

    def zero_student(params, x_hat, t, w):  # F = x̂/tan t, so f = cos t·x_t − sin t·σ_d·F = 0
        return x_hat / jnp.tan(t)[:, None, None, None], jnp.zeros(x_hat.shape[0])

    x0 = SIGMA_DATA * batch["latents"]
    real, fake, t_d, w = nets.renoised_pair(zero_student, None, x0, jax.random.key(4))
    assert set(np.asarray(t_d).tolist()) <= set(nets.schedule[1:])  # never τ_0, pure noise
    assert set(np.asarray(w).tolist()) <= {2.0, 4.0}
    cos = jnp.cos(t_d)[:, None, None, None]
    np.testing.assert_allclose(real - fake, cos * x0 / SIGMA_DATA, atol=1e-5)
    draws = uniform_times(jax.random.key(5), nets.schedule[1:], 4096)[1]
    assert set(np.asarray(draws).tolist()) == set(nets.schedule[1:])  # τ_1 … τ_{N−1} and 0


def test_sampler_visits_exactly_the_training_step_set(monkeypatch):
    """`few_step_sample(steps=N)` with the run's flow_shift evaluates the student at the step set the
    recipe the engine builds from that config trains on, to the bit."""
    config = load_config("configs/tiny.py:s2flash", ["sample.flow_shift=3.0"])
    nets = initialiser(config).recipe.phases["generator"].loss.__self__
    assert nets.schedule == step_schedule(config.s2flash.steps, 3.0) != step_schedule(config.s2flash.steps, 1.0)
    seen = []

    def spy(model, x_t, t, sigma_data=SIGMA_DATA):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)[0]), t)
        return x_t

    monkeypatch.setattr(trigflow, "consistency_fn", spy)
    model = type("Student", (), {"config": config.model})()
    few_step_sample(model, jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 8, 32)), None, jax.random.key(0),
                    steps=config.s2flash.steps, guidance_scale=4.5, flow_shift=config.sample.flow_shift)
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(nets.schedule[:-1], np.float32))


def test_generator_loss_is_adversarial_plus_weighted_distillation_at_the_step_set():
    nets, state, batch = spy_setup()
    key = jax.random.key(6)
    loss, (metrics, _) = nets.generator_loss(state.params["student"], state, batch, key)
    np.testing.assert_allclose(loss, CONFIG.adversarial_weight * metrics["generator/adversarial"]
                               + CONFIG.distillation_weight * metrics["scm/loss"], rtol=1e-6)
    # The sCM term asked the teacher at interior times of the step set only: not pure noise, not 0.
    times = np.concatenate(nets.sprint.teacher_times)
    assert set(times.tolist()) <= set(nets.schedule[1:-1]) and len(times) == BATCH

    adversarial_only = dataclasses.replace(nets, config=dataclasses.replace(CONFIG, distillation_weight=0.0))
    only, (metrics_only, _) = adversarial_only.generator_loss(state.params["student"], state, batch, key)
    assert float(only) == CONFIG.adversarial_weight * float(metrics_only["generator/adversarial"])
    assert not any(k.startswith("scm/") for k in metrics_only)
    # The adversarial gradient reaches the student through the teacher's features and the heads.
    grads = jax.grad(lambda p: adversarial_only.generator_loss(p, state, batch, key)[0])(state.params["student"])
    assert float(jnp.abs(grads["scale"])) > 0 and float(jnp.abs(grads["shift"])) > 0


def test_discriminator_loss_is_the_gan_loss_on_the_pairs_features():
    for loss_name in GAN_LOSSES:
        nets, state, batch = spy_setup(dataclasses.replace(CONFIG, loss=loss_name, r1_gamma=0.0))
        key = jax.random.key(7)
        loss, (metrics, _) = nets.discriminator_loss(state.params["discriminator"], state, batch, key)
        real, fake = nets.discriminator_features(state, batch, key)
        heads = nets.heads(state.params["discriminator"])
        np.testing.assert_allclose(loss, GAN_LOSSES[loss_name].discriminator(heads(real), heads(fake)), rtol=1e-6)
        assert float(metrics["discriminator/r1"]) == 0.0


def test_phase_updates_before_counts_each_phases_share_of_the_cycle():
    cycle = ("generator", "discriminator", "discriminator")
    steps = jnp.arange(9)
    np.testing.assert_array_equal(phase_updates_before(steps, cycle, "discriminator"), [0, 0, 1, 2, 2, 3, 4, 4, 5])
    np.testing.assert_array_equal(phase_updates_before(steps, cycle, "generator"), [0, 1, 1, 1, 2, 2, 2, 3, 3])


def test_r1_is_lazy_and_equals_the_r1_penalty_on_the_real_features():
    """With r1_every=3 and alternating phases, the discriminator updates at global steps 1, 3, 5, ...
    apply R1 at the 1st, 4th, 7th: steps 1, 7, 13; the value is r1_penalty's with γ·r1_every on the
    same features, and the update's loss includes it."""
    config = dataclasses.replace(CONFIG, r1_gamma=0.1)  # large enough to be read off the loss
    nets, state, batch = spy_setup(config)
    key = jax.random.key(8)
    params = state.params["discriminator"]
    real, _ = nets.discriminator_features(state, batch, key)
    expected = r1_penalty(nets.heads(params), real, config.r1_gamma * config.r1_every)
    assert float(expected) > 0
    loss = jax.jit(nets.discriminator_loss)
    applied = []
    for step in range(1, 15, 2):
        value, (metrics, _) = loss(params, state.replace(step=jnp.int32(step)), batch, key)
        applied.append(int(metrics["discriminator/r1_applied"]))
        if applied[-1]:
            np.testing.assert_allclose(metrics["discriminator/r1"], expected, rtol=1e-5)
            without, _ = loss(params, state.replace(step=jnp.int32(step + 2)), batch, key)
            np.testing.assert_allclose(value - without, expected, rtol=1e-4)
        else:
            assert float(metrics["discriminator/r1"]) == 0.0
    assert applied == [1, 0, 0, 1, 0, 0, 1]


def test_unconditional_stage_switches_the_features_caption_exactly_at_its_step():
    config = dataclasses.replace(CONFIG, unconditional_after=10)
    nets, state, batch = spy_setup(config)
    null_batch = {**batch, "caption": jnp.broadcast_to(state.frozen["null_caption"], batch["caption"].shape)}
    key = jax.random.key(9)

    def features(step, batch):
        return nets.discriminator_features(state.replace(step=jnp.int32(step)), batch, key)

    for step, expect in ((9, batch), (10, null_batch), (11, null_batch)):
        caption, mask = nets.discriminator_captions(state.replace(step=jnp.int32(step)), batch)
        np.testing.assert_array_equal(caption, expect["caption"])
        np.testing.assert_array_equal(mask, batch["caption_mask"])  # each prompt's own mask (no null mask)
        # The features of the real and the fake are those of the expected captions, in both phases.
        assert_states_equal(features(step, batch), features(9, expect))
    metrics = [nets.generator_loss(state.params["student"], state.replace(step=jnp.int32(s)), batch, key)[1][0]
               for s in (9, 10)]
    assert [float(m["s2flash/unconditional"]) for m in metrics] == [0.0, 1.0]
    assert float(metrics[0]["generator/adversarial"]) != float(metrics[1]["generator/adversarial"])


@pytest.mark.parametrize("bad, key", [
    (dict(steps=3), "s2flash.steps=3"), (dict(steps=16), "s2flash.steps"),
    (dict(block_ids=()), "s2flash.block_ids"), (dict(block_ids=(-1, 2)), "s2flash.block_ids"),
    (dict(block_ids=(1, 1)), "s2flash.block_ids"), (dict(loss="wasserstein"), "s2flash.loss"),
    (dict(r1_every=0), "s2flash.r1_every"), (dict(r1_gamma=-1e-5), "s2flash.r1_gamma"),
    (dict(unconditional_after=-1), "s2flash.unconditional_after"),
    (dict(adversarial_weight=-0.5), "s2flash.adversarial_weight"),
    (dict(cycle=("generator", "d")), "s2flash.cycle"),
    (dict(steps=1), "s2flash.distillation_weight=1.0 with s2flash.steps=1"),
    (dict(adversarial_weight=0.0, distillation_weight=0.0), "both 0"),
])
def test_config_is_validated_with_one_error_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        S2FlashConfig(**bad)


def test_overrides_and_networks_are_checked_against_the_config(tmp_path):
    assert S2FlashConfig(steps=1, distillation_weight=0.0).steps == 1  # purely adversarial 1-step student
    with pytest.raises(ConfigError, match=r"override 's2flash.steps=6'.*expected one of \(1, 2, 4, 5, 8\)"):
        load_config("configs/tiny.py:s2flash", ["s2flash.steps=6"])
    config = load_config("configs/tiny.py:s2flash", ["s2flash.block_ids=0,2"])
    with pytest.raises(ConfigError, match=r"s2flash.block_ids \[0, 2\] must name teacher blocks in \[0, 2\)"):
        initialiser(config)


def test_train_command_runs_s2flash_and_resumes_bit_for_bit(tmp_path):
    """`s2flash train --config configs/tiny.py:s2flash`: generator and discriminator alternate, lazy R1 on
    every other discriminator update and the unconditional stage from step 3 take effect, and a run
    stopped after 2 updates and resumed equals an uninterrupted one, discriminator and optimizer states
    included."""
    data = write_tiny_dataset(tmp_path / "data", num_records=32)
    overrides = [f"data.path={data}", "train.steps=4", "train.log_every=0", "train.checkpoint_every=2",
                 "train.ema_decay=0.9", "s2flash.unconditional_after=3"]
    config = load_config("configs/tiny.py:s2flash", overrides)
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    assert [int(m["discriminator/r1_applied"]) for m in whole.losses[1::2]] == [1, 0]
    assert [m["s2flash/unconditional"] for m in whole.losses] == [0.0, 0.0, 0.0, 1.0]
    assert all(np.isfinite(v) for m in whole.losses for v in m.values())

    assert main(["train", "--config", f"{REPO}/configs/tiny.py:s2flash", "--out", str(tmp_path / "split"),
                 "--stop-after", "2", *overrides]) == 0
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert rest.losses == whole.losses[2:]
    assert_states_equal(rest.state, whole.state)

    _, initial, _ = create_train_state(config, make_mesh(config.mesh))
    final = whole.state.distill
    for name in ("student", "discriminator"):
        assert any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(final.params[name]), jax.tree.leaves(initial.distill.params[name])))
    assert_states_equal(final.frozen, initial.distill.frozen)


def test_demo_rows_of_a_recipe_are_its_own_step_counts():
    from s2flash_jax.demo import RECIPES, student_rows

    assert list(student_rows("S2-Flash student", None, RECIPES["s2flash"].steps)) == [
        "S2-Flash student, 1 step", "S2-Flash student, 5 steps", "S2-Flash student, 8 steps"]
    assert RECIPES["sana-sprint"].steps == (1, 2, 4)
    config = load_config(f"{REPO}/configs/shapes.py:{RECIPES['s2flash'].variant}")
    assert config.recipe == "s2flash" and config.s2flash.steps == max(RECIPES["s2flash"].steps)
