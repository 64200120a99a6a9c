"""The SANA-Sprint recipe on the tiny SANA config: which network each update touches, where gradients
flow, and how the teacher is guided."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from s2flash_jax.config import load_config
from s2flash_jax.flows.trigflow import trigflow_from_flow_matching
from s2flash_jax.losses.ladd import LADDConfig
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.recipes.base import Phase, Recipe, distill_step
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig, discriminator_for, sana_sprint

BATCH, SIZE, CAPTION = 8, 4, 3
CONFIG = SanaSprintConfig(ladd=LADDConfig(block_ids=(0, 1)))


def networks(seed=0, config=CONFIG):
    precision = load_config("configs/tiny.py").precision
    student_config = dataclasses.replace(load_config("configs/tiny.py").model, logvar_head=True)
    teacher_config = load_config("configs/tiny.py:teacher").model
    student = SanaTransformer(student_config, precision=precision, rngs=nnx.Rngs(seed))
    teacher = SanaTransformer(teacher_config, precision=precision, rngs=nnx.Rngs(seed + 1))
    # zero-initialised output layers would make student and teacher agree, every tangent vanish and
    # captions be ignored
    for net, key in ((student, 2), (teacher, 3)):
        for kernel in (net.proj_out.kernel, net.transformer_blocks.attn2.to_out.kernel):
            kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed + key), kernel[...].shape)
    return student, teacher, discriminator_for(teacher, config, rngs=nnx.Rngs(seed + 4))


@pytest.fixture(scope="module")
def setup():
    student, teacher, heads = networks()
    channels = student.config.caption_channels
    null_caption = jax.random.normal(jax.random.key(5), (CAPTION, channels))
    optimizers = {"student": optax.adam(1e-3), "discriminator": optax.adam(1e-3)}
    recipe, state = sana_sprint(student, teacher, heads, null_caption, None, CONFIG, optimizers)
    keys = jax.random.split(jax.random.key(6), 2)
    batch = {"latents": jax.random.normal(keys[0], (BATCH, SIZE, SIZE, student.config.in_channels)),
             "caption": jax.random.normal(keys[1], (BATCH, CAPTION, channels)),
             "caption_mask": jnp.ones((BATCH, CAPTION), jnp.int32).at[::2, -1].set(0)}
    return recipe, state, batch


def same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_each_update_changes_only_the_network_it_trains(setup):
    recipe, state, batch = setup
    update = {name: jax.jit(functools.partial(recipe.phase_update, name)) for name in ("generator", "discriminator")}

    after_g, metrics = update["generator"](state, batch, jax.random.key(0))
    assert not same(after_g.params["student"], state.params["student"])
    assert same(after_g.params["discriminator"], state.params["discriminator"])
    assert same(after_g.opt_state["discriminator"], state.opt_state["discriminator"])
    assert same(after_g.stats, state.stats)  # heads are in eval mode: no power iteration
    assert same(after_g.frozen, state.frozen)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["scm/tangent_norm"]) > 0 and float(metrics["generator/grad_norm"]) > 0

    after_d, metrics = update["discriminator"](after_g, batch, jax.random.key(1))
    assert same(after_d.params["student"], after_g.params["student"])
    assert same(after_d.opt_state["student"], after_g.opt_state["student"])
    assert not same(after_d.params["discriminator"], after_g.params["discriminator"])
    assert not same(after_d.stats, after_g.stats)  # one power iteration per discriminator pass
    assert same(after_d.frozen, state.frozen)
    assert 0.0 <= float(metrics["discriminator/accuracy"]) <= 1.0
    assert int(after_d.step) == 2


def test_teacher_gets_no_gradient_while_the_adversarial_gradient_flows_through_it(setup):
    recipe, state, batch = setup
    generator, discriminator = recipe.phases["generator"], recipe.phases["discriminator"]
    nets = generator.loss.__self__
    adversarial_only = dataclasses.replace(nets, config=dataclasses.replace(CONFIG, scm_weight=0.0))

    @jax.jit
    def grads(state, key):
        def wrt_frozen(phase):
            return jax.grad(lambda teacher: phase.loss(
                state.params[phase.trains], state.replace(frozen={**state.frozen, "teacher": teacher}), batch,
                key)[0])(state.frozen["teacher"])

        student_grad = jax.grad(lambda p: adversarial_only.generator_loss(p, state, batch, key)[0])(
            state.params["student"])
        return wrt_frozen(generator), wrt_frozen(discriminator), student_grad

    from_generator, from_discriminator, adversarial = grads(state, jax.random.key(2))
    for tree in (from_generator, from_discriminator):
        assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(tree))
    assert float(optax.tree.norm(adversarial)) > 0


def test_teacher_is_guided_with_the_null_caption(setup):
    """(uncond, cond) from one doubled call equal two separate TrigFlow-wrapped teacher calls; the null
    caption takes each prompt's mask (NVlabs), as no null mask was given."""
    recipe, state, batch = setup
    nets = recipe.phases["generator"].loss.__self__
    teacher = nnx.merge(nets.teacher, state.frozen["teacher"])
    x_hat = batch["latents"]
    t = jnp.linspace(0.2, 1.4, BATCH)

    def separately(caption):
        def flow(x, s):
            return teacher(x, s, caption, batch["caption_mask"])

        return trigflow_from_flow_matching(flow)(x_hat, t)

    uncond, cond = nets.teacher_fn(state, batch)(x_hat, t)
    null = jnp.broadcast_to(state.frozen["null_caption"], batch["caption"].shape)
    np.testing.assert_allclose(uncond, separately(null), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cond, separately(batch["caption"]), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(uncond - cond).max()) > 1e-3


def test_update_cycle_and_distill_step_follow_the_schedule(setup):
    recipe, state, batch = setup
    two_to_one = dataclasses.replace(recipe, cycle=("generator", "generator", "discriminator"))
    assert [two_to_one.phase_at(i).name for i in range(6)] == ["generator", "generator", "discriminator"] * 2
    assert recipe.phase_at(0).name == "generator" and recipe.phase_at(1).name == "discriminator"

    calls = []
    spy = {name: Phase(name, p.trains, lambda params, s, b, k, name=name: calls.append(name) or
                       (jnp.float32(0.0) * jax.tree.leaves(params)[0].sum(), ({}, {})))
           for name, p in recipe.phases.items()}
    spied = dataclasses.replace(two_to_one, phases=spy)
    for step in range(3):
        distill_step(spied, state, batch, jax.random.key(step), step)
    assert calls == ["generator", "generator", "discriminator"]


def test_mismatched_networks_and_recipes_are_rejected():
    student, teacher, heads = networks()
    null = jnp.zeros((CAPTION, student.config.caption_channels))
    mask = jnp.ones(CAPTION, jnp.int32)
    with pytest.raises(ValueError, match="guidance_embeds=True and logvar_head=True"):
        sana_sprint(teacher, teacher, heads, null, mask, CONFIG)
    with pytest.raises(ValueError, match=r"block_ids \[0, 5\]"):
        sana_sprint(student, teacher, heads, null, mask, SanaSprintConfig(ladd=LADDConfig(block_ids=(0, 5))))
    with pytest.raises(ValueError, match="cycle"):
        Recipe("r", ("a",), (), {"p": Phase("p", "a", None)}, ("q",), {"a": optax.sgd(1.0)})
    with pytest.raises(ValueError, match="optimizers"):
        Recipe("r", ("a",), (), {"p": Phase("p", "a", None)}, ("p",), {})


def test_reference_optimizer_skips_and_counts_non_finite_updates():
    from s2flash_jax.recipes.common import reference_optimizer

    optimizer = reference_optimizer(learning_rate=1e-2)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = optimizer.init(params)
    bad = {"w": jnp.full((3, 2), jnp.nan), "b": jnp.ones(2)}
    updates, state = optimizer.update(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates)) and int(state.total_notfinite) == 1
    good = jax.tree.map(jnp.ones_like, params)
    updates, state = optimizer.update(good, state, params)
    assert float(optax.tree.norm(updates)) > 0 and int(state.total_notfinite) == 1


def test_caption_length_must_match_the_null_caption(setup):
    recipe, state, batch = setup
    nets = recipe.phases["generator"].loss.__self__
    short = {**batch, "caption": batch["caption"][:, :-1], "caption_mask": batch["caption_mask"][:, :-1]}
    message = f"batch captions have {CAPTION - 1} tokens but the null caption has {CAPTION}"
    with pytest.raises(ValueError, match=message):
        nets.teacher_fn(state, short)
