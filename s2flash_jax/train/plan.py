"""`s2flash plan`: what one device holds during a training step on a given mesh, before renting it.

The whole training step (every phase) is compiled ahead of time for abstract inputs on a mesh of
fake CPU devices with the target's device count; nothing is allocated. Parameters, EMA, frozen
teacher and optimizer state are counted exactly from their shapes and shardings; activations and
temporaries are XLA's buffer assignment for the compiled step (the CPU compiler's: an accelerator
compiler fuses differently, so treat that column as an estimate within tens of percent).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from s2flash_jax.parallel.mesh import make_mesh, tree_shardings
from s2flash_jax.train.metrics import DEVICE_MEMORY
from s2flash_jax.train.state import initialiser
from s2flash_jax.train.step import compile_ahead, step_peak_bytes

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. held: what lives across steps, by part; step_peak: per phase, held state
    plus the batch, temporaries and any outputs not written in place."""

    mesh: dict[str, int]
    device_kind: str
    capacity: int
    held: dict[str, int]
    temporaries: dict[str, int]
    step_peak: dict[str, int]

    @property
    def fits(self) -> bool:
        return max(self.step_peak.values()) <= self.capacity

    def table(self) -> str:
        rows = [("part", "per device")]
        rows += [(f"held: {name}", _size(size)) for name, size in self.held.items()]
        rows += [(f"temporaries: {phase} step", _size(size)) for phase, size in self.temporaries.items()]
        rows += [(f"peak: {phase} step", _size(size)) for phase, size in self.step_peak.items()]
        rows.append((f"capacity: {self.device_kind}", _size(self.capacity)))
        width = max(len(r[0]) for r in rows)
        lines = [f"{a:<{width}}  {b:>14}" for a, b in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        headroom = self.capacity - max(self.step_peak.values())
        return "\n".join(lines + [f"{verdict}: {headroom / GIB:+.2f} GiB headroom at the larger step's peak"])


def _size(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / (1 << 20):.2f} MiB"


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a pytree of shapes laid out by `shardings` (same structure)."""
    sizes = [math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
             for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)]
    return int(sum(sizes))


def plan_memory(config, device_kind: str, log: Callable[[str], None] | None = None) -> MemoryPlan:
    """config: s2flash_jax.config.Config whose mesh spans the available devices."""
    if device_kind not in DEVICE_MEMORY:
        raise ValueError(f"unknown device kind {device_kind!r}; expected one of {sorted(DEVICE_MEMORY)}")
    mesh = make_mesh(config.mesh)
    setup = initialiser(config)
    shardings = tree_shardings(setup.abstract, mesh)
    a, s = setup.abstract, shardings
    held = {
        "trained parameters": per_device_bytes(a.distill.params, s.distill.params),
        "EMA": per_device_bytes(a.ema, s.ema),
        "frozen (teacher)": per_device_bytes(a.distill.frozen, s.distill.frozen),
        "optimizer state": per_device_bytes(a.distill.opt_state, s.distill.opt_state),
        "other state": per_device_bytes((a.distill.stats, a.key, a.step), (s.distill.stats, s.key, s.distill.step)),
    }
    compiled, _ = compile_ahead(setup.recipe, shardings, mesh, config, setup.abstract, log=log)
    temporaries, peaks = {}, {}
    for phase, c in compiled.items():
        temporaries[phase] = int(c.memory_analysis().temp_size_in_bytes)
        peaks[phase] = step_peak_bytes(c)
    return MemoryPlan(mesh=dict(mesh.shape), device_kind=device_kind, capacity=DEVICE_MEMORY[device_kind],
                      held=held, temporaries=temporaries, step_peak=peaks)
