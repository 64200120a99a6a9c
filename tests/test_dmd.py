"""Distribution matching (losses/dmd.py) on Gaussian data, where the real and the fake score are known
in closed form: the gradient's formula and normalisation, its sign and fixed point, a generator trained
by it alone, the fake-score loss's minimiser, and the DM times (timestep sharing or random)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2flash_jax.flows.trigflow import (
    MAX_TIME, SIGMA_DATA, flow_time, noised, scm_timesteps, trigflow_from_flow_matching)
from s2flash_jax.losses.dmd import (
    DM_FLOW_TIME_RANGE, dm_time_for_steps, distribution_matching, distribution_matching_gradient, fake_score_loss,
    guided_x0, random_times, sample_times, shared_times, x0_predictor)
from tests.gaussian import DiagonalGaussian, time_mlp

TARGET = DiagonalGaussian(jnp.array([0.8, -0.4]), jnp.array([0.3, 1.2]))  # unit scale
SCHEDULE = scm_timesteps(4, shift=2.0)


def exact_x0(gaussian: DiagonalGaussian):
    """The exact x0 prediction (posterior mean, TrigFlow scale) for data σ_d·N(mu, sigma²)."""
    return x0_predictor(gaussian.trigflow_velocity)


def teacher_x0(target: DiagonalGaussian, other: DiagonalGaussian, scale):
    """The real score as the recipe builds it: a flow-matching teacher behind the TrigFlow wrapper,
    guided from an unrelated unconditional model; at scale 1 it is the target's exact x0."""
    def teacher(x_hat, t):
        return (trigflow_from_flow_matching(other.flow_velocity)(x_hat, t),
                trigflow_from_flow_matching(target.flow_velocity)(x_hat, t))

    return guided_x0(teacher, scale)


def samples(gaussian: DiagonalGaussian, key, batch):
    """x0 [batch, D] ~ σ_d·N(mu, sigma²) (TrigFlow scale)."""
    return SIGMA_DATA * (gaussian.mu + gaussian.sigma * jax.random.normal(key, (batch, 2)))


def dm_gradient(x0, t, key, real, fake):
    """(g, x̂0_real) at fresh re-noisings of x0 to t, as distribution_matching computes them."""
    x_t = noised(key, x0, t)
    x0_real = real(x_t, t)
    return distribution_matching_gradient(x0, x0_real, fake(x_t, t)), x0_real


def test_gradient_is_the_fake_real_gap_over_each_examples_mean_distance_to_the_teacher():
    keys = jax.random.split(jax.random.key(0), 3)
    x0, real, fake = (jax.random.normal(k, (3, 4, 2, 2)) for k in keys)
    g = np.asarray(distribution_matching_gradient(x0, real, fake))
    normaliser = np.abs(np.asarray(x0 - real)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(g, np.asarray(fake - real) / normaliser[:, None, None, None], rtol=1e-5)
    # scale-free: the same g for latents, teacher and fake all scaled alike
    np.testing.assert_allclose(distribution_matching_gradient(7 * x0, 7 * real, 7 * fake), g, rtol=1e-5)
    # per example: scaling one example's distance to the teacher leaves the others' g alone
    moved = distribution_matching_gradient(x0.at[0].set(real[0] + 10 * (x0[0] - real[0])), real, fake)
    np.testing.assert_allclose(moved[1:], g[1:], rtol=1e-6)
    np.testing.assert_allclose(moved[0], g[0] / 10, rtol=1e-5)
    # a sample that is the teacher's own prediction gets no gradient rather than NaN
    assert np.all(np.asarray(distribution_matching_gradient(real, real, fake))[...] == 0)


def test_the_loss_trains_only_the_sample_along_minus_g():
    """∂L/∂x̂0 = g / x̂0.size even with x_t built from x̂0 inside the loss; the score networks' parameters
    and the noised input get no gradient."""
    x0 = samples(DiagonalGaussian(0.0, 1.0), jax.random.key(1), 64)
    t = jnp.linspace(0.1, 1.4, 64)

    def loss(x0, mu_real, mu_fake):
        real = exact_x0(DiagonalGaussian(mu_real, TARGET.sigma))
        fake = exact_x0(DiagonalGaussian(mu_fake, 1.0))
        return distribution_matching(x0, noised(jax.random.key(2), x0, t), t, real, fake)[0]

    grads = jax.grad(loss, argnums=(0, 1, 2))(x0, TARGET.mu, jnp.zeros(2))
    g, _ = dm_gradient(x0, t, jax.random.key(2), exact_x0(TARGET), exact_x0(DiagonalGaussian(0.0, 1.0)))
    assert float(jnp.abs(g).mean()) > 0.1
    np.testing.assert_allclose(grads[0], g / x0.size, rtol=1e-4, atol=1e-9)
    assert not np.any(grads[1]) and not np.any(grads[2])


@pytest.mark.parametrize("mode", ["random", "shared"])
def test_g_vanishes_when_the_generator_samples_the_target(mode):
    """Guided flow teacher (scale 1) against the closed-form fake score of the same distribution: g is
    float noise, a thousand times smaller than for a generator one standard deviation off."""
    keys = jax.random.split(jax.random.key(3), 3)
    _, t = sample_times(keys[0], SCHEDULE, 4096, mode)
    real = teacher_x0(TARGET, DiagonalGaussian(jnp.array([-1.0, 2.0]), 2.0), 1.0)
    g, _ = dm_gradient(samples(TARGET, keys[1], 4096), t, keys[2], real, exact_x0(TARGET))
    assert float(jnp.max(jnp.abs(g))) < 1e-3
    off = DiagonalGaussian(TARGET.mu + TARGET.sigma, TARGET.sigma)
    g_off, _ = dm_gradient(samples(off, keys[1], 4096), t, keys[2], real, exact_x0(off))
    assert float(jnp.mean(jnp.abs(g_off))) > 1000 * float(jnp.max(jnp.abs(g)))


def test_guided_x0_is_the_x0_of_the_guided_velocity():
    """x0 is affine in F, so the real score at scale w extrapolates the two x0 predictions by w."""
    other = DiagonalGaussian(jnp.array([-1.0, 2.0]), 2.0)
    x_t, t = samples(other, jax.random.key(4), 16), jnp.linspace(0.05, 1.5, 16)
    uncond, cond = exact_x0(other)(x_t, t), exact_x0(TARGET)(x_t, t)
    np.testing.assert_allclose(teacher_x0(TARGET, other, 4.5)(x_t, t), uncond + 4.5 * (cond - uncond),
                               rtol=1e-3, atol=1e-3)


def test_a_shifted_generator_is_pushed_toward_the_target_mean_by_the_exact_amount():
    """Generator N(m, sigma²), target N(mu, sigma²): x̂0_fake − x̂0_real = σ_d·(m − mu)·sin²t /
    (cos²t·sigma² + sin²t) at every x_t, so −g has the sign of mu − m for every sample and time."""
    m = TARGET.mu + jnp.array([-0.5, 0.7])
    generator = DiagonalGaussian(m, TARGET.sigma)
    keys = jax.random.split(jax.random.key(5), 3)
    _, t = random_times(keys[0], SCHEDULE, 2048, (0.001, 0.999))
    x0 = samples(generator, keys[1], 2048)
    g, x0_real = dm_gradient(x0, t, keys[2], exact_x0(TARGET), exact_x0(generator))
    cos2, sin2 = jnp.cos(t)[:, None] ** 2, jnp.sin(t)[:, None] ** 2
    gap = SIGMA_DATA * (m - TARGET.mu) * sin2 / (cos2 * TARGET.sigma**2 + sin2)
    normaliser = jnp.mean(jnp.abs(x0 - x0_real), axis=1, keepdims=True)
    # (compared before normalisation: near t = 0 both x0 predictions are ≈ x_t and their float32
    # difference carries a ~1e-7 rounding that dividing by a small normaliser would magnify)
    np.testing.assert_allclose(g * normaliser, gap, rtol=1e-4, atol=1e-6)
    assert np.all(np.sign(-np.asarray(g)) == np.sign(np.asarray(TARGET.mu - m)))


def test_minus_g_grows_a_too_narrow_and_shrinks_a_too_wide_generator():
    """Same mean, std 0.5x the target's in dimension 0 and 1.5x in dimension 1: −g is positively
    correlated with x̂0 − mu where the generator must widen, negatively where it must narrow, and has
    no mean component; the generator's own fake score is what tells them apart (the teacher's alone
    pulls every sample toward its own x0 prediction)."""
    generator = DiagonalGaussian(TARGET.mu, TARGET.sigma * jnp.array([0.5, 1.5]))
    keys = jax.random.split(jax.random.key(6), 3)
    _, t = random_times(keys[0], SCHEDULE, 1 << 16)
    x0 = samples(generator, keys[1], 1 << 16)
    g, _ = dm_gradient(x0, t, keys[2], exact_x0(TARGET), exact_x0(generator))
    spread = np.asarray(jnp.mean(-g * (x0 - SIGMA_DATA * TARGET.mu), axis=0))
    assert spread[0] > 0 > spread[1], spread
    mean = np.asarray(jnp.mean(-g, axis=0))
    assert np.all(np.abs(mean) < 0.1 * np.abs(spread) / (SIGMA_DATA * generator.sigma)), (mean, spread)


@pytest.mark.parametrize("mode", ["random", "shared"])
def test_an_affine_generator_trained_by_dm_with_exact_fake_scores_reaches_the_target(mode):
    """x̂0 = σ_d·(a ⊙ z + b), z ~ N(0, 1): its fake score is the closed form of N(b, a²), so the DM loss
    alone (random DMD2 times, or the 4-step student's shared trajectory times) must move (a, b) from
    (1, 0) to the target's std and mean."""
    optimizer = optax.adam(optax.cosine_decay_schedule(0.03, 1500, alpha=0.05))
    real = exact_x0(TARGET)

    def loss(params, key):
        a, b = params
        z_key, t_key, noise_key = jax.random.split(key, 3)
        x0 = SIGMA_DATA * (a * jax.random.normal(z_key, (512, 2)) + b)
        _, t = sample_times(t_key, SCHEDULE, 512, mode)
        fake = exact_x0(DiagonalGaussian(jax.lax.stop_gradient(b), jax.lax.stop_gradient(jnp.abs(a))))
        return distribution_matching(x0, noised(noise_key, x0, t), t, real, fake)[0]

    @jax.jit
    def fit(params):
        def step(carry, i):
            params, opt = carry
            grads = jax.grad(loss)(params, jax.random.fold_in(jax.random.key(7), i))
            updates, opt = optimizer.update(grads, opt)
            return (optax.apply_updates(params, updates), opt), None

        return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(1500))[0][0]

    a, b = fit((jnp.ones(2), jnp.zeros(2)))
    # g is exactly 0 at the target (both scores closed form), so the fit is tight, not just within 10 %
    assert np.all(np.abs(np.asarray(b - TARGET.mu)) < 0.02 * np.asarray(TARGET.sigma)), (b, TARGET.mu)
    np.testing.assert_allclose(jnp.abs(a), TARGET.sigma, rtol=0.02)


def test_fake_score_loss_is_minimised_by_the_generators_exact_posterior():
    """Over the Gaussian velocity family F = DiagonalGaussian(m, s).trigflow_velocity, the loss on
    samples of N(mu, sigma²) is stationary at (mu, sigma) and larger off it; the samples get no gradient."""
    keys = jax.random.split(jax.random.key(8), 3)
    x0 = samples(TARGET, keys[0], 1 << 17)
    _, t = random_times(keys[1], SCHEDULE, 1 << 17, (0.001, 0.999))

    def loss(params, x0=x0):
        return fake_score_loss(DiagonalGaussian(*params).trigflow_velocity, x0, t, keys[2])[0]

    exact = (TARGET.mu, TARGET.sigma)
    grad_exact = jax.grad(loss)(exact)
    for off in ((TARGET.mu + 0.5 * TARGET.sigma, TARGET.sigma), (TARGET.mu, TARGET.sigma * 1.5)):
        grad_off = jax.grad(loss)(off)
        assert float(loss(off)) > float(loss(exact))
        # (not 0 at the exact point: the Monte Carlo loss's own minimiser is O(1/√batch) away)
        assert optax.tree.norm(grad_exact) < 0.1 * optax.tree.norm(grad_off), (grad_exact, grad_off)
    assert not np.any(jax.grad(lambda x: loss(exact, x))(x0))


def test_a_small_mlp_trained_with_the_fake_score_loss_learns_the_exact_x0_prediction():
    """Trained on generator samples at DM times, a small MLP's x0 prediction approaches the closed form:
    its error is a fraction of the distance between the target's and a generator 0.5 std away's."""
    generator = DiagonalGaussian(TARGET.mu + 0.5 * TARGET.sigma, TARGET.sigma * jnp.array([0.7, 1.3]))
    params, mlp = time_mlp(jax.random.key(9))
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, 2000, alpha=0.1))

    def loss(params, key):
        x_key, t_key, z_key = jax.random.split(key, 3)
        _, t = random_times(t_key, SCHEDULE, 256, DM_FLOW_TIME_RANGE)
        return fake_score_loss(lambda x, s: mlp(params, x, s), samples(generator, x_key, 256), t, z_key)[0]

    @jax.jit
    def fit(params):
        def step(carry, i):
            params, opt = carry
            grads = jax.grad(loss)(params, jax.random.fold_in(jax.random.key(10), i))
            updates, opt = optimizer.update(grads, opt)
            return (optax.apply_updates(params, updates), opt), None

        return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(2000))[0][0]

    params = fit(params)
    keys = jax.random.split(jax.random.key(11), 3)
    _, t = random_times(keys[0], SCHEDULE, 4096, DM_FLOW_TIME_RANGE)
    x_t = noised(keys[2], samples(generator, keys[1], 4096), t)
    learned = x0_predictor(lambda x, s: mlp(params, x, s))(x_t, t)
    exact, other = exact_x0(generator)(x_t, t), exact_x0(TARGET)(x_t, t)
    error, reference = (float(jnp.sqrt(jnp.mean(d**2))) for d in (learned - exact, other - exact))
    assert error < 0.15 * reference, (error, reference)


def test_shared_times_are_the_students_trajectory_times_and_random_times_are_not():
    """4-step shifted schedule τ_0 > … > τ_4 = 0: step k's x̂0 is matched at τ_{k+1} (where the sampler
    re-noises it), the final step at τ_3; random times are DMD2's flow-time range whatever k is."""
    tau = np.asarray(SCHEDULE, np.float32)
    np.testing.assert_array_equal(dm_time_for_steps(SCHEDULE), tau[[1, 2, 3, 3]])
    k, t = shared_times(jax.random.key(12), SCHEDULE, 4000)
    assert set(np.asarray(k).tolist()) == {0, 1, 2, 3} and np.all(np.bincount(np.asarray(k)) > 900)
    np.testing.assert_array_equal(t, tau[np.minimum(np.asarray(k) + 1, 3)])
    assert set(np.asarray(t).tolist()) <= set(tau[1:-1].tolist())  # only times the sampler visits

    k, t = random_times(jax.random.key(13), SCHEDULE, 4000)
    s = np.asarray(flow_time(t))
    assert set(np.asarray(k).tolist()) == {0, 1, 2, 3}
    assert s.min() >= 0.02 - 1e-6 and s.max() <= 0.98 + 1e-6 and abs(s.mean() - 0.5) < 0.02
    for step in range(4):  # t does not depend on k
        assert abs(s[np.asarray(k) == step].mean() - 0.5) < 0.05

    np.testing.assert_array_equal(dm_time_for_steps(scm_timesteps(1)), np.float32([MAX_TIME]))
    with pytest.raises(ValueError, match="time mode 'uniform'"):
        sample_times(jax.random.key(0), SCHEDULE, 4, "uniform")
    with pytest.raises(ValueError, match="decreases strictly to 0"):
        dm_time_for_steps([MAX_TIME, 1.0])
