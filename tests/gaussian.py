"""Gaussian data x̂0 ~ N(mu, diag sigma²) in unit scale: every flow quantity is closed form.

Shapes: x [B, D] with mu, sigma [D] (or scalars); times [B].
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    mu: jax.Array | float
    sigma: jax.Array | float

    def flow_velocity(self, x, s):
        """E[ε − x̂0 | x_s] for x_s = (1−s)·x̂0 + s·ε."""
        s = s[:, None]
        r = (x - (1 - s) * self.mu) / ((1 - s) ** 2 * self.sigma**2 + s**2)
        return s * r - self.mu - (1 - s) * self.sigma**2 * r

    def trigflow_velocity(self, x_hat, t):
        """E[−sin t·x̂0 + cos t·ε | x̂_t] for x̂_t = cos t·x̂0 + sin t·ε."""
        t = t[:, None]
        r = (x_hat - jnp.cos(t) * self.mu) / (jnp.cos(t) ** 2 * self.sigma**2 + jnp.sin(t) ** 2)
        return -jnp.sin(t) * (self.mu + jnp.cos(t) * self.sigma**2 * r) + jnp.cos(t) * jnp.sin(t) * r

    def ode_endpoint(self, x_hat, t, mu=None, sigma=None):
        """Where the probability-flow ODE from (x̂_t, t) lands at t = 0: the per-dimension affine
        map between N(cos t·mu, cos²t·sigma² + sin²t) and N(mu, sigma²). mu, sigma override the
        data's, to build perturbed consistency functions."""
        mu = self.mu if mu is None else mu
        sigma = self.sigma if sigma is None else sigma
        t = t[:, None]
        std = jnp.sqrt(jnp.cos(t) ** 2 * sigma**2 + jnp.sin(t) ** 2)
        return mu + sigma * (x_hat - jnp.cos(t) * mu) / std

    def consistency_as_trigflow(self, x_hat, t, mu=None, sigma=None):
        """The F for which f(x_t, t) = cos t·x_t − sin t·σ_d·F(x̂_t, t) is the exact ODE endpoint
        (unit scale: f/σ_d = cos t·x̂ − sin t·F)."""
        x0_hat = self.ode_endpoint(x_hat, t, mu, sigma)
        return (jnp.cos(t)[:, None] * x_hat - x0_hat) / jnp.sin(t)[:, None]
