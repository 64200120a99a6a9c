"""Merging model checkpoints by weight interpolation: `s2flash merge CKPT [CKPT ...] --out CKPT`.

SD3.5-Flash's split-timestep fine-tuning forks a trained run into branches, each fine-tuned on a
range of the student's timesteps (`s2flash train --fork`, docs/sd35_flash.md), and merges the
branches' models back into one: every parameter of the output is Σ_i w_i θ_i over the sources,
accumulated in float32 and stored in the sources' dtype.

The sources must be float (not quantized) model checkpoints of one architecture with the same
stored parameters (names, shapes, dtypes); weights are N non-negative numbers summing to 1
(default: 1/N each). The output carries the first source's components and extra metadata
(text encoder, sampling settings) and records the merge in model.json:
  "merge": {"sources": [paths as given], "weights": [w_1, ..., w_N]}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from s2flash_jax.model_checkpoint import (
    CheckpointError, check_architecture, copy_components, extra_metadata, read_model_config, read_stored_params,
    save_model, stored_params)
from s2flash_jax.outputs import OutputExists, refuse_existing_output
from s2flash_jax.quantize import read_quantization
from s2flash_jax.storage import resolve

KEY = "merge"  # model.json key of a merged checkpoint
WEIGHT_SUM_TOLERANCE = 1e-6


class MergeError(CheckpointError):
    """A merge that cannot be done as asked; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class MergeResult:
    sources: tuple[Path, ...]
    weights: tuple[float, ...]
    parameters: int  # scalar parameters in each checkpoint


def merge_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """The weights of `count` sources: `weights` checked (count of them, finite, >= 0, summing to 1
    within WEIGHT_SUM_TOLERANCE), or 1/count each when None."""
    if weights is None:
        return (1.0 / count,) * count
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise MergeError(f"--weights: {len(weights)} weight(s) for {count} checkpoint(s); expected one per checkpoint")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise MergeError(f"--weights {' '.join(map(str, weights))}: expected non-negative numbers summing to 1 "
                         f"(they sum to {sum(weights):.6g})")
    return weights


def _check_sources(sources: Sequence[Path]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The stored parameters (name -> shape, dtype) the sources share; an error naming the first
    source that is quantized, of another architecture or stored otherwise."""
    for path in sources:
        quantization = read_quantization(path)  # reads model.json: also refuses a non-checkpoint
        if quantization is not None:
            raise MergeError(f"{path} is quantized (int{quantization.bits}): its weights do not interpolate; merge "
                             f"the float checkpoints and quantize the merged one")
    first = sources[0]
    config = read_model_config(first)
    layout = {name: (tuple(s.shape), np.dtype(s.dtype)) for name, s in stored_params(first).items()}
    for path in sources[1:]:
        check_architecture(path, config)
        other = {name: (tuple(s.shape), np.dtype(s.dtype)) for name, s in stored_params(path).items()}
        differing = sorted(name for name in set(layout) | set(other) if layout.get(name) != other.get(name))
        if differing:
            raise MergeError(f"{path} stores its parameters otherwise than {first}: "
                             + ", ".join(f"{n} {other.get(n)} (expected {layout.get(n)})" for n in differing[:3]))
    not_float = sorted(name for name, (_, dtype) in layout.items() if not jnp.issubdtype(dtype, jnp.floating))
    if not_float:
        raise MergeError(f"{first}: parameters {not_float[:3]} are not floats; only float weights interpolate")
    return layout


def merge_checkpoints(sources: Sequence[str | Path], out: str | Path, *, weights: Sequence[float] | None = None,
                      force: bool = False) -> MergeResult:
    """`s2flash merge`: write Σ_i weights[i] · sources[i] as a model checkpoint at `out` (see the
    module docstring). Holds the float32 sum and one source's parameters at a time. `out` appears
    only when complete; an existing one is refused unless force, and so is a source as `out`."""
    sources, out = tuple(resolve(s) for s in sources), resolve(out)
    if not sources:
        raise MergeError("merge needs at least one model checkpoint")
    weights = merge_weights(weights, len(sources))
    layout = _check_sources(sources)
    if out.exists() and any(out.resolve() == s.resolve() for s in sources):
        raise OutputExists(f"--out {str(out)!r} is one of the checkpoints being merged; write elsewhere")
    refuse_existing_output(out, force=force)  # before reading every source; save_model checks again
    names = sorted(layout)
    total: dict[str, np.ndarray] = {}
    for path, weight in zip(sources, weights):
        if weight == 0.0:  # skipped, not added as 0·θ: weights (1, 0) copy the first exactly, whatever θ_2 holds
            continue
        for name, value in read_stored_params(path, names).items():
            term = np.float32(weight) * value.astype(np.float32)
            # The first term starts the sum (not 0 + term, which would turn -0.0 into +0.0).
            if name in total:
                total[name] += term
            else:
                total[name] = term
    merged = traverse_util.unflatten_dict({tuple(n.split("/")): total[n].astype(layout[n][1]) for n in names})
    save_model(out, read_model_config(sources[0]), merged, force=force, write_components=copy_components(sources[0]),
               metadata={**extra_metadata(sources[0]),
                         KEY: {"sources": [str(s) for s in sources], "weights": list(weights)}})
    return MergeResult(sources, weights, sum(math.prod(shape) for shape, _ in layout.values()))
