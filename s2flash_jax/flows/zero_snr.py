"""Discrete DDPM schedules for a flow / TrigFlow core: the zero-terminal-SNR rescale (Lin, Liu, Li,
Yang, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891), the
schedule's noise levels as flow and TrigFlow times, and "trailing" sampling timesteps.

A DDPM-schedule model (SD1.5, SDXL) sees x = α·x0 + σ·ε at integer timestep i in [0, T), with
ᾱ = Π_{j≤i} (1 − β_j), α = √ᾱ and σ = √(1 − ᾱ). The same state in this package's conventions:
- rectified flow (flows/flow_matching.py): x / (α + σ) = (1 − s)·x0 + s·ε at s = σ / (α + σ);
- TrigFlow (flows/trigflow.py): x itself is the network input x̂ = x_t/σ_d = cos t·x0 + sin t·ε at
  t = arctan(σ / α), since α² + σ² = 1; `trigflow.flow_time(t)` is the s above.
Both times keep the schedule's signal-to-noise ratio α²/σ², so SNR 0 (ᾱ = 0) is s = 1, t = π/2.

Schedules are host-side constant tables (one entry per training timestep), built once in NumPy
float64 so they are exact whatever jax_enable_x64 says; index `jnp.asarray(table)` inside a
jitted function. The time maps take and return JAX arrays, so they also run on traced values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.precision import at_least_fp32

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Stable Diffusion's "scaled_linear" schedule: β linear in √β from √beta_start to √beta_end.

    Defaults are SD1.5/SDXL's. Returns betas [T] float64 (diffusers builds the same in float32).
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 2")
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(betas) -> np.ndarray:
    """ᾱ_i = Π_{j≤i} (1 − β_j): the signal variance at each timestep. betas: [T] -> [T] float64."""
    betas = _as_schedule(betas, "betas")
    return np.cumprod(1.0 - betas)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Rescale a schedule so its last timestep has zero signal (Lin et al. 2305.08891, Algorithm 1).

    a = √ᾱ is shifted so a_T = 0, then scaled so a_1 keeps its value: a ← (a − a_T)·a_1/(a_1 − a_T);
    then ᾱ = a² and β_i = 1 − ᾱ_i/ᾱ_{i−1} (β_1 = 1 − ᾱ_1). The first timestep's SNR is unchanged
    (to rounding); the last has ᾱ_T = 0 exactly (β_T = 1), because a_T − a_T is an exact zero.
    betas: [T] -> [T] float64, as diffusers' `rescale_zero_terminal_snr`.
    """
    a = np.sqrt(alphas_cumprod(betas))
    first, last = a[0], a[-1]
    if not first > last:
        raise ValueError(f"the schedule must lose signal over time to be rescaled: expected "
                         f"√ᾱ_1 > √ᾱ_T, got {first} and {last}")
    a = (a - last) * (first / (first - last))
    abar = a**2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def noise_levels(abar) -> tuple[np.ndarray, np.ndarray]:
    """(α, σ) = (√ᾱ, √(1 − ᾱ)) per timestep: the signal and noise scales of x = α·x0 + σ·ε.

    abar: ᾱ [T] (`alphas_cumprod`) -> two arrays [T] float64.
    """
    abar = _as_schedule(abar, "alphas_cumprod")
    if np.any((abar < 0) | (abar > 1)):
        raise ValueError(f"alphas_cumprod must lie in [0, 1], got values in [{abar.min()}, {abar.max()}]")
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def flow_time_of_levels(alpha, sigma) -> jax.Array:
    """Rectified-flow time with the same SNR as x = α·x0 + σ·ε: s = σ / (α + σ) (0 -> clean, 1 -> noise).

    alpha, sigma: [...] (≥ 0, not both 0) -> s [...] at least float32.
    """
    alpha, sigma = _levels(alpha, sigma)
    return sigma / (alpha + sigma)


def trigflow_time_of_levels(alpha, sigma) -> jax.Array:
    """TrigFlow time with the same SNR as x = α·x0 + σ·ε: t = arctan(σ / α) in [0, π/2].

    arctan2, so zero signal (α = 0) is exactly π/2 in the result's dtype. alpha, sigma: [...] -> t [...].
    """
    alpha, sigma = _levels(alpha, sigma)
    return jnp.arctan2(sigma, alpha)


def levels_of_flow_time(s) -> tuple[jax.Array, jax.Array]:
    """The inverse of `flow_time_of_levels`, normalised to α² + σ² = 1.

    s = σ/(α + σ) fixes the ratio σ : α = s : (1 − s). s: [...] in [0, 1] -> (α, σ) [...].
    """
    s = at_least_fp32(jnp.asarray(s))
    norm = jnp.sqrt(s**2 + (1 - s) ** 2)
    return (1 - s) / norm, s / norm


def levels_of_trigflow_time(t) -> tuple[jax.Array, jax.Array]:
    """The inverse of `trigflow_time_of_levels`: (α, σ) = (cos t, sin t). t: [...] in [0, π/2] -> (α, σ) [...]."""
    t = at_least_fp32(jnp.asarray(t))
    return jnp.cos(t), jnp.sin(t)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Sampling timesteps with "trailing" spacing (2305.08891 Table 2; diffusers' timestep_spacing="trailing").

    Steps of T/n counted down from T, so the first step is the last training timestep T − 1 (with a
    zero-terminal-SNR schedule: pure noise) and the last is ≈ T/n − 1, never 0; e.g. T = 1000, n = 4:
    [999, 749, 499, 249]. The arange and round-half-to-even are diffusers' own, so every timestep is
    theirs; diffusers' np.arange(T, 0, −T/n) has a float-rounded length that for some n (61 and 103
    of T = 1000, for instance) adds an (n+1)-th step, −1, which is not a timestep, so it is cut.
    Returns int64 [num_steps], strictly decreasing.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={num_train_timesteps}]")
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)[:num_steps]).astype(np.int64) - 1


def _as_schedule(values, name: str) -> np.ndarray:
    """A 1-D float64 copy of a schedule table, or a ValueError naming it."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"{name} must be a 1-D table with one entry per timestep (≥ 2), got shape {array.shape}")
    return array


def _levels(alpha, sigma) -> tuple[jax.Array, jax.Array]:
    """alpha, sigma as JAX arrays of one dtype, at least float32."""
    alpha, sigma = jnp.asarray(alpha), jnp.asarray(sigma)
    dtype = jnp.promote_types(jnp.result_type(alpha, sigma), jnp.float32)
    return alpha.astype(dtype), sigma.astype(dtype)
