"""A model checkpoint: one network's weights and architecture, the unit runs exchange.

CKPT/
  model.json   {"format": "s2flash-model", "version": 1, "model": {"kind": backbone kind, architecture
               fields}, ...extra metadata}; a "model" without "kind" (written before kinds) is SANA's
  params/      orbax checkpoint of the parameters as a plain nested dict (nnx.to_pure_dict layout)
  ...          optional components written next to them (e.g. the shapes demo's text_encoder/)

A finished run exports its product (EMA if kept) as one; `train.teacher_checkpoint` and
`s2flash sample --ckpt` read one. The directory appears only when complete (on object storage,
where it is uploaded file by file, model.json comes last: a directory without it is no checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from s2flash_jax.models.backbone import BackboneConfig, architecture_from_json, architecture_to_json, kind_of
from s2flash_jax.outputs import fresh_output_dir
from s2flash_jax.storage import PathLike, local_copy, resolve

FORMAT = "s2flash-model"
VERSION = 1
METADATA = "model.json"  # written last: its presence marks a complete checkpoint


class CheckpointError(ValueError):
    """A model checkpoint that cannot be read or does not fit; the message says which and why."""


def save_model(path: PathLike, model: BackboneConfig, params: nnx.State | Mapping[str, Any], *, force: bool = False,
               metadata: Mapping[str, Any] | None = None,
               write_components: Callable[[epath.Path], None] | None = None) -> epath.Path:
    """Write `params` (the nnx.Param state of the backbone built from `model`, or the same as a
    nested dict of arrays in the nnx.to_pure_dict layout) to `path`.

    metadata: extra JSON fields for model.json. write_components(staging_dir) adds files beside the
    weights before the checkpoint appears. An existing non-empty `path` is refused unless force.
    """
    path = resolve(path)
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    with fresh_output_dir(path, force=force, last=(METADATA,)) as staging:
        # Uncompressed: float weights barely compress, and compressing holds an extra copy of the
        # arrays in flight (the 1.6B model's import would need two copies of its weights).
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(staging / "params", args=ocp.args.PyTreeSave(pure))
        if write_components is not None:
            write_components(staging)
        (staging / METADATA).write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "model": architecture_to_json(model), **(metadata or {})},
            indent=2) + "\n")
    return path


def read_metadata(path: PathLike) -> dict[str, Any]:
    """model.json of the checkpoint at `path`, checked to be one."""
    meta_path = resolve(path) / METADATA
    if not meta_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a model checkpoint: it has no model.json (expected a directory "
                              f"written by a finished run's export or `s2flash convert import`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    return meta


def extra_metadata(path: PathLike) -> dict[str, Any]:
    """model.json's fields beyond the format and the model config (components, sampling, ...): what a
    checkpoint derived from this one carries over."""
    return {k: v for k, v in read_metadata(path).items() if k not in ("format", "version", "model")}


def components(path: PathLike) -> list[epath.Path]:
    """The checkpoint's components: everything beside model.json and params/ (e.g. text_encoder/)."""
    return [p for p in resolve(path).iterdir() if p.name not in (METADATA, "params")]


def copy_components(path: PathLike, names: Collection[str] | None = None) -> Callable[[epath.Path], None]:
    """A save_model write_components that copies the checkpoint's components (those in `names`, or
    all) into the new checkpoint."""
    items = [item for item in components(path) if names is None or item.name in names]

    def write(staging: epath.Path) -> None:
        for item in items:
            with local_copy(item) as local:
                (shutil.copytree if local.is_dir() else shutil.copy2)(local, staging / item.name)

    return write


def read_model_config(path: PathLike) -> BackboneConfig:
    """The architecture of the checkpoint at `path` (its backbone kind's config)."""
    model = read_metadata(path).get("model")
    try:
        return architecture_from_json(model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/model.json: its model config cannot be used: {e}") from e


def check_architecture(path: PathLike, expected: BackboneConfig, ignoring: Sequence[str] = ()) -> None:
    """Raise CheckpointError naming every architecture key in which the checkpoint differs (apart
    from execution keys and the keys `ignoring`), or the kinds of model when they differ."""
    saved = read_model_config(path)
    if type(saved) is not type(expected):
        raise CheckpointError(f"model checkpoint {path} holds a {kind_of(saved).name} model; "
                              f"expected a {kind_of(expected).name} model")
    skipped = (*type(expected).EXECUTION_KEYS, *ignoring)
    differing = [f"{f.name}={getattr(saved, f.name)!r} (expected {getattr(expected, f.name)!r})"
                 for f in dataclasses.fields(expected)
                 if f.name not in skipped and getattr(saved, f.name) != getattr(expected, f.name)]
    if differing:
        raise CheckpointError(f"model checkpoint {path} holds a different architecture: {', '.join(differing)}")


def load_params(path: PathLike, expected: BackboneConfig, abstract: nnx.State, shardings: Any = None, *,
                quantized: bool = False) -> nnx.State:
    """The checkpoint's parameters, laid out as `abstract` (an nnx.State of ShapeDtypeStructs or arrays)
    with `shardings` (a matching tree of shardings, or None for the default device).

    The checkpoint must hold a model with the architecture `expected`: every differing key is named.
    Parameters are cast to the dtypes of `abstract`. A quantized checkpoint (model.json
    "quantization", see quantize.py) is refused unless quantized=True (`abstract` is then the
    quantized model's, quantize.abstract_quantized_model).
    """
    check_architecture(path, expected)
    quantization = read_metadata(path).get("quantization")
    if quantization is not None and not quantized:
        raise CheckpointError(
            f"model checkpoint {path} holds int{quantization.get('bits')} weights (`s2flash quantize`): it samples "
            f"and exports, but does not load as a float model (to train from, or as a teacher); use the checkpoint "
            f"it was quantized from ({quantization.get('source', 'see its model.json')})")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(resolve(path) / "params", nnx.to_pure_dict(target))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"model checkpoint {path}: its parameters cannot be restored: {e}") from e
    state = jax.tree.map(lambda x: x, abstract)  # a copy to fill in
    nnx.replace_by_pure_dict(state, restored)
    return state


def stored_params(path: PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """'/'-joined parameter path -> shape and dtype as stored, without reading any weights."""
    read_metadata(path)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(resolve(path) / "params").item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in keys): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for keys, m in flat}


def read_stored_params(path: PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Some parameters ('/'-joined paths, see stored_params) as stored, read without the others:
    streaming a checkpoint out a few parameters at a time never holds the whole model."""
    item: dict[str, Any] = {}
    restore_args: dict[str, Any] = {}
    for name in names:
        *parents, leaf = name.split("/")
        node, args = item, restore_args
        for key in parents:
            node, args = node.setdefault(key, {}), args.setdefault(key, {})
        node[leaf], args[leaf] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(resolve(path) / "params", args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return {name: functools.reduce(lambda node, key: node[key], name.split("/"), restored) for name in names}
