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


class MeshError(ValueError):
    """Mesh sizes that cannot lay out the available devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the data, fsdp and tensor axes; one may be -1 (the devices left over)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"mesh {self.describe()}: sizes must be positive, with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(f"mesh {self.describe()}: {num_devices} devices do not divide by {known}")
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise MeshError(f"mesh {self.describe()} needs {math.prod(sizes)} devices, found {num_devices}")
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


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES):
    """NamedShardings for every array of a (possibly abstract) pytree, same structure.

    A variable carrying logical axis names is sharded as the rules say, except along dimensions
    the named mesh axes do not divide (and wholly replicated if the names do not match its rank:
    optimizer statistics such as CAME's row/column factors inherit their parameter's names but not
    its shape). Everything else (scalars, keys, unnamed arrays) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def for_variable(var: nnx.Variable):
        if not hasattr(var.get_value(), "shape"):  # optax.MaskedNode: state a frozen parameter does not have
            return var
        names = var.get_metadata().get("out_sharding")
        shape = var.get_value().shape
        if not names or len(names) != len(shape):
            return var.replace(replicated)
        spec = [axes if _divides(mesh, axes, dim) else None
                for axes, dim in zip(logical_to_mesh_axes(tuple(names), rules), shape, strict=True)]
        return var.replace(NamedSharding(mesh, PartitionSpec(*spec)))

    def for_leaf(x):
        if isinstance(x, nnx.Variable):
            return for_variable(x)
        return replicated if hasattr(x, "shape") else None

    return jax.tree.map(for_leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _divides(mesh: Mesh, axes: MeshAxes, dim: int) -> bool:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    return dim > 0 and dim % size == 0


def sharded_shapes(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (same tree structure): what a checkpoint
    restores onto, and what a step is compiled for ahead of time."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over every device of the data and fsdp axes (replicated over tensor)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """rows [n, ...] followed by copies of the last one up to [size, ...]."""
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)]) if len(rows) < size else rows


def padded_batches(arrays: Sequence[np.ndarray], batch_size: int, devices: int):
    """Consecutive batches of the rows of `arrays` (all of one length N), for a jitted function split
    over `devices`: yields (the batch's arrays, its number of real rows). Full batches have
    batch_size rows (a multiple of devices); the last is padded with copies of its last row to the
    smallest devices·2^k that holds it, so a small set is not padded to a whole batch and at most
    log2(batch_size / devices) + 1 shapes are ever compiled."""
    total = len(arrays[0])
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        size = devices
        while size < count:
            size *= 2
        size = min(size, batch_size)
        yield [pad_rows(a[start:start + count], size) for a in arrays], count


def sharded_init(build: Callable[[], M], mesh: Mesh,
                 rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> M:
    """build() run under jit with every variable created directly in its shard on `mesh`."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = tree_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(build())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
