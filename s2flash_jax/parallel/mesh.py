"""The device mesh of a run and parameters created directly in their shards.

A mesh has three axes: `data` (batch), `fsdp` (batch and parameter shards) and `tensor` (heads /
MLP hidden). Sizes come from the config; one of them may be -1 for "all remaining devices".
Parameters never exist unsharded: `sharded_init` traces the module's constructor abstractly,
derives every parameter's sharding from its logical axis names (parallel/axes.py) and runs the
constructor under jit with those out_shardings, so each device only materialises its shard.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from s2flash_jax.parallel.axes import LOGICAL_AXIS_RULES, MeshAxes, logical_to_mesh_axes

MESH_AXES = ("data", "fsdp", "tensor")
M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the data, fsdp and tensor axes; one may be -1 (the devices left over)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {self.describe()}: sizes must be positive, with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self.describe()}: {num_devices} devices do not divide by {known}")
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {self.describe()} needs {math.prod(sizes)} devices, found {num_devices}")
        return sizes

    def describe(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}"


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), tensor the fastest-varying axis.

    Axes are Auto (compiler-propagated shardings): the models' einsums carry no sharding
    annotations, which Explicit axes would require.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> nnx.State:
    """NamedShardings for a (possibly abstract) state whose variables carry logical axis names.

    Variables without names are replicated.
    """

    def to_sharding(spec):
        return NamedSharding(mesh, logical_to_mesh_axes(tuple(spec), rules))

    return jax.tree.map(to_sharding, nnx.get_partition_spec(state),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_init(build: Callable[[], M], mesh: Mesh,
                 rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> M:
    """build() run under jit with every variable created directly in its shard on `mesh`."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(build())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
