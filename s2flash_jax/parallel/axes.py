"""The one table that maps logical parameter/activation axis names to mesh axes.

Models name their axes (`embed`, `heads`, `mlp`, ...; see `s2flash_jax.models.layers`); only this
table knows the mesh. Changing the parallelism of a run means passing other rules, not editing a
model. A mesh axis that the run's mesh does not have (or has with size 1) shards nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# FSDP over the model width, tensor parallelism over heads / MLP hidden / adaLN outputs.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # Gemma-2's grouped key/value projections
    ("vocab", "tensor"),  # Gemma-2's token embedding rows
    ("mlp", "tensor"),
    ("adaln", "tensor"),
    ("caption", None),
    ("time_freq", None),
    ("patch_in", None),
    ("patch_out", None),
    ("table", None),
    ("conv_window", None),
    ("scalar", None),
    ("lora", None),  # a LoRA adapter's rank
)


def logical_to_mesh_axes(
    names: Sequence[str | None], rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """Map logical axis names (one per array axis) to a PartitionSpec.

    A mesh axis is used at most once per spec: a later axis that maps to an already used mesh axis
    is left unsharded (e.g. a [D, D] matrix named (`embed`, `embed`) shards only its first axis).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known axes: {sorted(table)}")
        mesh_axes = table[name]
        as_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        if any(a in used for a in as_tuple):
            spec.append(None)
            continue
        used.update(as_tuple)
        spec.append(mesh_axes)
    return PartitionSpec(*spec)
