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


def time_mlp(key: jax.Array, dim: int = 2, hidden: int = 64):
    """(params, apply): a small MLP F(x̂ [B, dim], t [B]) -> [B, dim] with sin/cos time features, its
    output layer zero so it starts at F = 0 (for students trained on the Gaussian teacher)."""
    k = jax.random.split(key, 2)
    features = dim + 8
    params = {"w1": jax.random.normal(k[0], (features, hidden)) / features**0.5, "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k[1], (hidden, hidden)) / hidden**0.5, "b2": jnp.zeros(hidden),
              "w3": jnp.zeros((hidden, dim)), "b3": jnp.zeros(dim)}

    def apply(p, x_hat, t):
        freqs = jnp.arange(1.0, 5.0)
        h = jnp.concatenate([x_hat, jnp.sin(freqs * t[:, None]), jnp.cos(freqs * t[:, None])], axis=1)
        h = jax.nn.silu(h @ p["w1"] + p["b1"])
        return jax.nn.silu(h @ p["w2"] + p["b2"]) @ p["w3"] + p["b3"]

    return params, apply
