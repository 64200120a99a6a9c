"""s2flash-jax: distil flow-matching text-to-image models into few-step students in JAX."""

__version__ = "0.1.0"
