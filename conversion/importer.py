"""`s2flash convert import`: a diffusers or original SANA checkpoint -> an s2flash model checkpoint.

Both formats become an `ImportPlan`: for each source tensor, the JAX parameters it goes to (a
block of a stacked parameter, after splitting a fused tensor and changing its layout). Tensors are
read one at a time into preallocated parameter buffers, so the import holds about one copy of the
weights: the buffers are 64-byte aligned so that JAX wraps them without copying, and orbax writes
them uncompressed without another copy. Parameters keep the dtypes they have in the source.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from conversion.errors import ConversionError
from conversion.layouts import Layout
from conversion.sana_diffusers import Row, key_table, param_shapes, tensor_keys
from conversion.sana_original import (NULL_CAPTION, POS_EMBED, check_pos_embed, infer_config, load_config_arg,
                                      original_rows)
from conversion.sources import (DIFFUSERS, SANA, TensorSource, check_format, check_tensors, open_diffusers,
                                open_original)
from s2flash_jax.model_checkpoint import save_model
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.outputs import refuse_existing_output
from s2flash_jax.storage import resolve

NULL_CAPTION_FILE = "null_caption.npy"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a source tensor (or row block `part` of `parts` equal ones, along dim 0) goes: JAX
    parameter `jax_path`, at index `block` of its stacked layers axis (None: not stacked)."""

    jax_path: str
    block: int | None
    layout: Layout
    part: int = 0
    parts: int = 1


@dataclasses.dataclass
class ImportPlan:
    """targets: source key -> where its pieces go; expected: source key -> shape it must have."""

    targets: dict[str, list[Target]] = dataclasses.field(default_factory=dict)
    expected: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def add(self, key: str, target: Target, piece_shape: tuple[int, ...]) -> None:
        self.targets.setdefault(key, []).append(target)
        self.expected[key] = (piece_shape[0] * target.parts, *piece_shape[1:])


@dataclasses.dataclass
class ImportResult:
    config: SanaConfig
    source_format: str
    parameters: int
    dtypes: dict[str, int]  # dtype name -> parameter count
    kept: list[str]  # source tensors diffusers drops that the checkpoint keeps
    ignored: list[str]  # source tensors not converted, with why


def build_plan(config: SanaConfig, rows: list[tuple[Row, str, int, int]]) -> ImportPlan:
    """rows: (key table row, source key template, part, parts) for every tensor of the model."""
    shapes = param_shapes(config)
    plan = ImportPlan()
    for row, source_key, part, parts in rows:
        for key, block in tensor_keys(row, config.num_layers):
            shape = shapes[row.jax_path] if block is None else shapes[row.jax_path][1:]
            plan.add(source_key.format(i=block), Target(row.jax_path, block, row.layout, part, parts),
                     tuple(row.layout.torch_shape(shape)))
    covered = {t.jax_path for targets in plan.targets.values() for t in targets}
    if covered != set(shapes):
        raise RuntimeError(f"the key table misses JAX parameters {sorted(set(shapes) - covered)}")
    return plan


def diffusers_plan(config: SanaConfig) -> ImportPlan:
    return build_plan(config, [(row, row.torch_key, 0, 1) for row in key_table(config)])


def original_plan(config: SanaConfig) -> ImportPlan:
    return build_plan(config, [(row, o.key, o.part, o.parts) for row, o in original_rows(config)])


def check_source(source: TensorSource, plan: ImportPlan, extras: tuple[str, ...], what: str) -> None:
    """One-line ConversionError if the source's tensors are not exactly the plan's (+ extras)."""
    check_tensors(source, plan.expected, what, "{what} does not fit the model: {problems} (`s2flash convert inspect` "
                  "lists every key)", keys=[key for key in source.keys() if key not in extras])


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """np.empty, 64-byte aligned: JAX on CPU then uses the buffer in place instead of copying it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_source_params(source: TensorSource, plan: ImportPlan, config: SanaConfig) -> dict[str, jax.Array]:
    """'/'-joined JAX parameter path -> array, reading the source one tensor at a time."""
    shapes = param_shapes(config)
    dtypes: dict[str, list[np.dtype]] = {}
    for key, targets in plan.targets.items():
        for target in targets:
            dtypes.setdefault(target.jax_path, []).append(source.spec(key).dtype)
    buffers = {path: aligned_empty(shapes[path], np.result_type(*dtypes[path])) for path in shapes}
    for key, targets in plan.targets.items():
        tensor = source.read(key)
        pieces = np.split(tensor, targets[0].parts, axis=0)
        for target in targets:
            buffer = buffers[target.jax_path]
            destination = buffer if target.block is None else buffer[target.block]
            destination[...] = target.layout.to_jax(pieces[target.part])
        del tensor, pieces
    cpu = jax.devices("cpu")[0]
    return {path: jax.device_put(buffer, cpu) for path, buffer in buffers.items()}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}} (the nnx.to_pure_dict layout)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree



@dataclasses.dataclass
class PreparedSource:
    """A source opened and checked against the model its config describes; no weights read yet.

    config_origin: where the config came from; null_caption_key: the original learned null caption,
    if present; kept / ignored: source tensors diffusers drops that are kept / not converted (why)."""

    config: SanaConfig
    tensors: TensorSource
    plan: ImportPlan
    config_origin: str
    null_caption_key: str | None = None
    kept: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)


def _prepare_diffusers(src: Path, config: str | None) -> PreparedSource:
    if config is not None:
        raise ConversionError("--config is for --format sana; a diffusers folder carries its config.json")
    folder = open_diffusers(src)
    try:
        sana_config = SanaConfig.from_diffusers(folder.config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder.path}/config.json: {e}") from e
    prepared = PreparedSource(sana_config, folder.tensors, diffusers_plan(sana_config), f"{folder.path}/config.json")
    check_source(prepared.tensors, prepared.plan, (), str(src))
    return prepared


def _prepare_original(src: Path, config: str | None) -> PreparedSource:
    source = open_original(src).tensors
    specs = {key: source.spec(key) for key in source.keys()}
    sana_config, origin = infer_config(specs, None if config is None else load_config_arg(config))
    prepared = PreparedSource(sana_config, source, original_plan(sana_config), origin)
    check_source(source, prepared.plan, (NULL_CAPTION, POS_EMBED), str(src))
    check_pos_embed(source, sana_config)
    if POS_EMBED in specs:
        prepared.ignored.append(f"{POS_EMBED} (a fixed sin-cos buffer, recomputed from the config)")
    if NULL_CAPTION in specs:
        prepared.null_caption_key = NULL_CAPTION
        prepared.kept.append(f"{NULL_CAPTION} (learned null caption) -> {NULL_CAPTION_FILE}")
    if sana_config.logvar_head:
        prepared.kept.append("logvar_linear (SANA-Sprint logvar head) -> parameters logvar_linear/*")
    return prepared


def prepare_source(src: str | Path, source_format: str, config: str | None = None) -> PreparedSource:
    """Open `src` in `source_format` and check it fits a SANA transformer (headers only).
    config: for the original format, a preset name or a diffusers-style config.json (default: the
    one preset that fits, which exists only for Sprint students)."""
    if source_format not in (DIFFUSERS, SANA):
        raise ConversionError(f"--format {source_format!r}: expected {DIFFUSERS} or {SANA}")
    src = resolve(src)
    check_format(src, source_format)
    return (_prepare_diffusers if source_format == DIFFUSERS else _prepare_original)(src, config)


def import_checkpoint(src: str | Path, source_format: str, out: str | Path, *, config: str | None = None,
                      force: bool = False) -> ImportResult:
    """Convert `src` (a diffusers transformer folder or an original SANA .pth/.safetensors) into an
    s2flash model checkpoint at `out`; see prepare_source for `config`."""
    out = resolve(out)
    prepared = prepare_source(src, source_format, config)
    refuse_existing_output(out, force=force)  # before the (long) read; save_model checks again
    flat = read_source_params(prepared.tensors, prepared.plan, prepared.config)
    metadata = {"converted_from": {"format": source_format, "path": os.path.abspath(src),
                                   "config": prepared.config_origin}}
    null_caption = None
    if prepared.null_caption_key is not None:
        null_caption = prepared.tensors.read(prepared.null_caption_key).astype(np.float32)
        metadata["null_caption"] = NULL_CAPTION_FILE

    def write_components(staging: Path) -> None:
        if null_caption is not None:
            np.save(staging / NULL_CAPTION_FILE, null_caption)

    save_model(out, prepared.config, nest(flat), force=force, metadata=metadata, write_components=write_components)
    dtypes: dict[str, int] = {}
    for value in flat.values():
        dtypes[str(value.dtype)] = dtypes.get(str(value.dtype), 0) + int(value.size)
    return ImportResult(prepared.config, source_format, sum(dtypes.values()), dtypes, prepared.kept, prepared.ignored)
