"""Zero-terminal-SNR schedules, their flow/TrigFlow times and trailing timesteps, against diffusers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.flows import trigflow
from s2flash_jax.flows.zero_snr import (
    alphas_cumprod, flow_time_of_levels, levels_of_flow_time, levels_of_trigflow_time, noise_levels,
    rescale_zero_terminal_snr, scaled_linear_betas, trailing_timesteps, trigflow_time_of_levels)

torch = pytest.importorskip("torch")
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as torch_rescale  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def sd_scheduler(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", **SD, **kwargs)


def test_rescaled_sd_schedule_has_zero_terminal_signal_and_keeps_the_first_snr():
    betas = scaled_linear_betas(**SD)
    before, after = alphas_cumprod(betas), alphas_cumprod(rescale_zero_terminal_snr(betas))
    assert before[-1] > 4e-3  # SD's flaw: ~7% of the signal amplitude left at t = T
    assert after[-1] == 0.0
    assert np.all(np.diff(after) < 0)
    snr = lambda abar: abar / (1 - abar)  # noqa: E731
    np.testing.assert_allclose(snr(after[0]), snr(before[0]), rtol=1e-12)

    alpha, sigma = noise_levels(after)
    assert (alpha[-1], sigma[-1]) == (0.0, 1.0)
    with jax.enable_x64(True):
        assert float(flow_time_of_levels(alpha, sigma)[-1]) == 1.0
        assert float(trigflow_time_of_levels(alpha, sigma)[-1]) == math.pi / 2
    # Without x64 the times are float32, and pure noise is still exact in it.
    assert flow_time_of_levels(alpha, sigma)[-1] == np.float32(1.0)
    assert trigflow_time_of_levels(alpha, sigma)[-1] == np.float32(math.pi / 2)


def test_schedules_equal_diffusers():
    """scaled_linear and the rescale against diffusers: float64 through its function, float32 through
    DDPMScheduler(rescale_betas_zero_snr=True) (cumulative products over 1000 float32 steps)."""
    betas = scaled_linear_betas(**SD)
    np.testing.assert_allclose(betas, sd_scheduler().betas.numpy(), rtol=1e-6)

    # β = 1 − ᾱ_i/ᾱ_{i−1} cancels: a few ulps of 1 (2.2e-16 each) is what float64 can agree on.
    reference = torch_rescale(torch.tensor(betas, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(rescale_zero_terminal_snr(betas), reference, rtol=0, atol=1e-15)

    # diffusers' float32 path rounds √ᾱ to a few ulps (measured ≤ 3e-7 against our float64 from the
    # same float32 betas), which the cancelling 1 − ᾱ_i/ᾱ_{i−1} turns into ≤ 7e-6 on β near t = T.
    # A formula error (no shift, a wrong scale or order) moves both by 1e-3 or more.
    zsnr = sd_scheduler(rescale_betas_zero_snr=True)
    ours = rescale_zero_terminal_snr(sd_scheduler().betas.numpy())
    np.testing.assert_allclose(alphas_cumprod(ours), zsnr.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, zsnr.betas.numpy(), rtol=0, atol=2e-5)
    assert zsnr.alphas_cumprod[-1] == 0.0 and ours[-1] == 1.0


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 25, 48, 61])
def test_trailing_timesteps_equal_diffusers(num_steps):
    """48 has ties that np.arange's rounding breaks differently from exact arithmetic; with 61
    diffusers returns a 62nd timestep, −1 (see trailing_timesteps)."""
    scheduler = DDPMScheduler(timestep_spacing="trailing", num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    theirs = scheduler.timesteps.numpy()
    ours = trailing_timesteps(num_steps, 1000)
    assert ours.shape == (num_steps,) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs[:num_steps])
    assert list(theirs[num_steps:]) in ([], [-1])
    assert ours[0] == 999 and ours[-1] >= 0 and np.all(np.diff(ours) < 0)


def test_trailing_timesteps_of_the_recipes():
    np.testing.assert_array_equal(trailing_timesteps(4), [999, 749, 499, 249])  # DMD2's 4-step SDXL list
    np.testing.assert_array_equal(trailing_timesteps(8), [999, 874, 749, 624, 499, 374, 249, 124])


def test_time_maps_are_monotone_and_invert_each_other():
    with jax.enable_x64(True):
        alpha, sigma = noise_levels(alphas_cumprod(rescale_zero_terminal_snr(scaled_linear_betas(**SD))))
        s, t = flow_time_of_levels(alpha, sigma), trigflow_time_of_levels(alpha, sigma)
        assert s.dtype == t.dtype == jnp.float64
        assert np.all(np.diff(s) > 0) and np.all(np.diff(t) > 0)
        for back in (levels_of_flow_time(s), levels_of_trigflow_time(t)):
            np.testing.assert_allclose(back[0], alpha, atol=1e-14)
            np.testing.assert_allclose(back[1], sigma, atol=1e-14)
        # The same time as the package's TrigFlow -> flow transform.
        np.testing.assert_allclose(trigflow.flow_time(t), s, atol=1e-14)

        grid = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float64)
        np.testing.assert_allclose(flow_time_of_levels(*levels_of_flow_time(grid)), grid, atol=1e-15)
        angles = grid * math.pi / 2
        np.testing.assert_allclose(trigflow_time_of_levels(*levels_of_trigflow_time(angles)), angles, atol=1e-15)

    # Unnormalised levels keep only their ratio: the SNR decides the time.
    np.testing.assert_allclose(flow_time_of_levels(3.0, 1.0), flow_time_of_levels(0.6, 0.2), rtol=1e-7)
    assert jax.jit(trigflow_time_of_levels)(jnp.zeros(2), jnp.ones(2)).dtype == jnp.float32


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_steps=0"):
        trailing_timesteps(0)
    with pytest.raises(ValueError, match="num_steps=1001"):
        trailing_timesteps(1001)
    with pytest.raises(ValueError, match="lose signal"):
        rescale_zero_terminal_snr(np.zeros(10))
    with pytest.raises(ValueError, match="1-D table"):
        rescale_zero_terminal_snr(np.full((2, 3), 0.01))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noise_levels(np.array([1.2, 0.5]))
