"""FLOPs of a JAX function counted from its jaxpr, and model FLOPs utilisation (MFU): what the
training loop logs as perf/mfu and the benchmark suite reports.

Why not XLA's cost analysis (`compiled.cost_analysis()["flops"]`): it counts the body of a loop
once, whatever its trip count, and the SANA backbone runs its blocks as one `lax.scan`, so a 28-layer
model reports the FLOPs of about one block. Counting the jaxpr instead multiplies each scan body by
its length. Only matrix products and convolutions are counted (2 FLOPs per multiply-add), the
usual convention for MFU: elementwise work is a few percent of a transformer's and no accelerator
runs it at peak rate. A step traced without gradient checkpointing counts model FLOPs; with it,
the recomputed forward passes are counted too (hardware FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend import core as jex_core

from s2flash_jax.train.metrics import PEAK_FLOPS, device_kind


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of the matrix products and convolutions of fn(*args, **kwargs), traced, not run."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_flops(jaxpr) -> int:
    """FLOPs of the matrix products and convolutions of a jaxpr (scan bodies times their length)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":  # one branch runs; count the dearest
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:  # jit, remat, custom_jvp/vjp calls, while (trip count unknown: once), shard_map, ...
            total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
    return total


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    # Each output element: one multiply-add per kernel tap of its group's input features.
    return 2 * math.prod(out) * (math.prod(kernel) // out_features)


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak FLOP/s of one device (s2flash_jax.train.metrics.PEAK_FLOPS), None if unknown (CPUs)."""
    kind = device_kind(device)
    return PEAK_FLOPS.get(kind) if kind else None


def model_flops_utilisation(flops_per_step: float, seconds_per_step: float, device: jax.Device) -> float | None:
    """Achieved FLOP/s of one device over its peak; None where the peak is unknown.
    flops_per_step: what that one device computes per step."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_step / seconds_per_step / peak
