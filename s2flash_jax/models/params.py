"""Flat views of a module's parameters, keyed by '/'-joined state paths.

The flat form ('transformer_blocks/attn1/to_q/kernel' -> array) is what converters and checkpoint
inspection work with; it does not depend on how NNX nests its state.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def _flat_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def param_paths(module: nnx.Module) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...] | None]]:
    """path -> (shape, logical axis names or None) for every parameter."""
    return {p: (tuple(v.get_value().shape), v.get_metadata().get("out_sharding")) for p, v in _flat_variables(module).items()}


def flat_params(module: nnx.Module) -> dict[str, jax.Array]:
    return {path: var[...] for path, var in _flat_variables(module).items()}


def set_flat_params(module: nnx.Module, values: Mapping[str, jax.Array]) -> None:
    """Overwrite the named parameters in place, keeping each parameter's dtype; shapes must match."""
    variables = _flat_variables(module)
    unknown = sorted(set(values) - set(variables))
    if unknown:
        raise KeyError(f"no such parameters: {unknown}")
    for path, value in values.items():
        var = variables[path]
        if tuple(value.shape) != tuple(var[...].shape):
            raise ValueError(f"parameter {path}: shape {tuple(value.shape)} != expected {tuple(var[...].shape)}")
        var[...] = jnp.asarray(value, dtype=var[...].dtype)
