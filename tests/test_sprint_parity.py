"""The SANA-Sprint recipe's phase losses against the PyTorch reference (tests/sprint_reference.py):
the same random networks (tiny student and teacher, every weight non-zero), batch and random
draws, so any difference is in the maths of the losses, their gradients or the discriminator's
power iteration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversion.sana_diffusers import diffusers_state_dict
from s2flash_jax.config import load_config
from s2flash_jax.losses.ladd import LADDConfig
from s2flash_jax.recipes.base import DistillState, Recipe
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig, discriminator_for, sana_sprint

torch = pytest.importorskip("torch")

from tests import sprint_reference as ref  # noqa: E402

BATCH, SIZE, CAPTION = 8, 8, 6  # one BatchNormLocal group of reals, two of fakes (misaligned pairs)
CONFIG = SanaSprintConfig(ladd=LADDConfig(block_ids=(0, 1)))
WARMED_UP = CONFIG.scm.tangent_warmup_steps  # r = 1: the student's own JVP enters the sCM target
KEY = jax.random.key(1)

# float32 on both sides; XLA and torch (oneDNN) differ only in summation order. Measured on these
# draws: generator metrics ≤ 2.7e-6 relative (scm/loss, a sum of terms of either sign), its loss
# 1.6e-7; student gradients ≤ 3.6e-6 of each tensor's largest entry; discriminator loss equal, logit
# means ≤ 2.5e-7 relative; u and v ≤ 7e-8 (unit vectors). Wrong maths moves these far beyond RTOL
# (measured by breaking the JAX side): the tangent term's sign moves scm/loss by 1.7e-3 at r = 1 and
# gradients by 0.3 of their largest entry; CFG with cond and uncond swapped, scm/loss by 3e-3 at
# either step; misaligned pairs rolled the other way, the discriminator loss by 6e-4.
RTOL = 1e-4
# The order of the discriminator's fake and real passes is not checked: it shows only through
# BatchNormLocal's eps (the norm cancels the entry and residual convs' 1/σ, the cls conv's σ is exact
# after one power iteration, and u, v end the same after two passes in either order), moving the
# logit means by ~1e-5 relative, too close to float32 noise on another CPU to hold in CI.
UV_ATOL = 1e-5
GENERATOR_METRICS = ("scm/loss", "scm/loss_no_logvar", "scm/tangent_norm", "scm/logvar", "generator/adversarial")


@dataclasses.dataclass
class Setup:
    nets: ref.Networks
    recipe: Recipe
    state: DistillState
    batch: dict[str, jax.Array]
    torch_batch: ref.TorchBatch


@dataclasses.dataclass
class PhaseResult:
    """One framework's phase loss. grads: student gradients by diffusers key in torch layout
    (generator); vectors: spectral-norm u, v by JAX state path after the phase (discriminator)."""

    loss: float
    metrics: dict[str, float]
    grads: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    vectors: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)


def floats(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def jax_student_grads(student: nnx.Module, grads) -> dict[str, np.ndarray]:
    """Gradients w.r.t. the student's parameters renamed and laid out as torch's (conversion's key
    table), the JAX-only logvar head under the reference's logvar_linear names."""
    as_model = nnx.merge(nnx.graphdef(student), grads)
    named = diffusers_state_dict(as_model)
    named["logvar_linear.weight"] = np.asarray(as_model.logvar_linear.kernel[...]).T
    named["logvar_linear.bias"] = np.asarray(as_model.logvar_linear.bias[...])
    return named


def spectral_vectors(stats) -> dict[tuple, np.ndarray]:
    """Every u and v of a DiscriminatorHeads BatchStat state, by state path."""
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(stats)}


# ---- fixtures: each JAX loss is compiled once ----

@pytest.fixture(scope="module")
def setup() -> Setup:
    student_config = load_config("configs/tiny.py").model
    teacher_config = load_config("configs/tiny.py:teacher").model
    nets = ref.build_networks(student_config, teacher_config, CONFIG)
    batch = ref.make_batch(BATCH, SIZE, CAPTION, student_config)
    recipe, state = sana_sprint(nets.student, nets.teacher, nets.discriminator, jnp.asarray(batch["null_caption"]),
                                jnp.asarray(batch["null_caption_mask"]), CONFIG)
    jax_batch = {name: jnp.asarray(batch[name]) for name in ("latents", "caption", "caption_mask")}
    return Setup(nets, recipe, state, jax_batch, ref.torch_batch(batch, CONFIG.scm.sigma_data))


def torch_generator(setup: Setup, draws: ref.GeneratorDraws, step: int) -> PhaseResult:
    student = setup.nets.torch_student
    student.zero_grad(set_to_none=True)
    loss, metrics = ref.torch_generator_loss(setup.nets, setup.torch_batch, draws, CONFIG, step)
    loss.backward()
    grads = {name.removeprefix("model."): p.grad.numpy() for name, p in student.named_parameters()}
    return PhaseResult(loss.item(), floats(metrics), grads=grads)


@pytest.fixture(scope="module")
def generator_phase(setup: Setup) -> dict[int, tuple[PhaseResult, PhaseResult]]:
    """step -> (JAX, torch) generator losses on the same draws, before (r = 0) and after the
    tangent warm-up (r = 1); the step is traced, so one compilation serves both."""
    loss_and_grads = jax.jit(jax.value_and_grad(setup.recipe.phases["generator"].loss, has_aux=True))
    draws = ref.jax_generator_draws(KEY, setup.batch["latents"].shape, CONFIG)
    results = {}
    for step in (0, WARMED_UP):
        state = setup.state.replace(step=jnp.int32(step))
        (loss, (metrics, _)), grads = loss_and_grads(state.params["student"], state, setup.batch, KEY)
        jax_result = PhaseResult(float(loss), floats(metrics), grads=jax_student_grads(setup.nets.student, grads))
        results[step] = jax_result, torch_generator(setup, draws, step)
    return results


@pytest.fixture(scope="module")
def discriminator_phase(setup: Setup) -> tuple[PhaseResult, PhaseResult]:
    """(JAX, torch) discriminator losses on the same draws, with u, v after the phase (torch's
    read through a JAX copy of its heads, so both come keyed and laid out alike)."""
    loss, (metrics, stats) = jax.jit(setup.recipe.phases["discriminator"].loss)(
        setup.state.params["discriminator"], setup.state, setup.batch, KEY)
    jax_result = PhaseResult(float(loss), floats(metrics), vectors=spectral_vectors(stats["discriminator"]))

    draws = ref.jax_discriminator_draws(KEY, setup.batch["latents"].shape, CONFIG)
    heads = setup.nets.torch_discriminator.heads
    initial = {name: value.clone() for name, value in heads.state_dict().items()}
    with torch.no_grad():
        torch_loss, torch_metrics = ref.torch_discriminator_loss(setup.nets, setup.torch_batch, draws, CONFIG)
    after = discriminator_for(setup.nets.teacher, CONFIG, rngs=nnx.Rngs(0))
    ref.load_torch_heads(after, heads)
    # Train mode moved the torch u, v in place; the generator phase must read them as the JAX state does.
    heads.load_state_dict(initial)
    return jax_result, PhaseResult(float(torch_loss), floats(torch_metrics),
                                   vectors=spectral_vectors(nnx.state(after, nnx.BatchStat)))


# ---- generator phase: sCM + adversarial ----

@pytest.mark.parametrize("step", [0, WARMED_UP])
def test_generator_loss_and_metrics_match_torch(generator_phase, step):
    jax_result, torch_result = generator_phase[step]
    assert jax_result.loss == pytest.approx(torch_result.loss, rel=RTOL)
    for name in GENERATOR_METRICS:
        assert jax_result.metrics[name] == pytest.approx(torch_result.metrics[name], rel=RTOL), name


def test_tangent_term_counts_after_warmup(generator_phase):
    """The r = 1 comparison checks the JVP term (and its sign) only if that term is large."""
    before, after = (generator_phase[step][0].metrics["scm/tangent_norm"] for step in (0, WARMED_UP))
    assert abs(after - before) > 100 * RTOL * abs(before)


@pytest.mark.parametrize("step", [0, WARMED_UP])
def test_generator_gradients_match_torch_autograd(generator_phase, step):
    """Every student tensor, logvar head included: JAX's gradient of the whole generator loss
    (the adversarial term through the frozen teacher) against torch's backward."""
    jax_result, torch_result = generator_phase[step]
    assert set(jax_result.grads) == set(torch_result.grads)
    errors = {name: np.abs(grad - torch_result.grads[name]).max() / np.abs(torch_result.grads[name]).max()
              for name, grad in jax_result.grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: max |Δ| is {errors[worst]:.1e} of its largest entry"


# ---- discriminator phase: hinge loss, misaligned pairs, power iteration ----

def test_discriminator_loss_and_metrics_match_torch(discriminator_phase):
    jax_result, torch_result = discriminator_phase
    assert jax_result.loss == pytest.approx(torch_result.loss, rel=RTOL)
    for name in ("discriminator/real_logit", "discriminator/fake_logit"):
        assert jax_result.metrics[name] == pytest.approx(torch_result.metrics[name], rel=RTOL), name
    # Accuracy counts signs: float noise could flip a logit lying within ~1e-6 of zero, one of
    # 3·BATCH·2·SIZE² = 3072 logits; any real mismatch flips many.
    logits = 3 * BATCH * len(CONFIG.ladd.block_ids) * SIZE**2
    assert abs(jax_result.metrics["discriminator/accuracy"] - torch_result.metrics["discriminator/accuracy"]) \
        <= 1 / logits


def test_spectral_norm_vectors_match_torch_after_fake_and_real_passes(setup, discriminator_phase):
    jax_result, torch_result = discriminator_phase
    assert set(jax_result.vectors) == set(torch_result.vectors)
    for path, value in jax_result.vectors.items():
        np.testing.assert_allclose(value, torch_result.vectors[path], rtol=0, atol=UV_ATOL, err_msg=str(path))
    initial = spectral_vectors(setup.state.stats["discriminator"])
    assert any(np.abs(value - initial[path]).max() > 1e-2 for path, value in jax_result.vectors.items())
