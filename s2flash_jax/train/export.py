"""`s2flash export RUN_DIR`: a run's product as a model checkpoint and/or a diffusers folder, on any host.

A pod run's checkpoints hold every network and optimizer state in the shards of its mesh, written by
all its processes. Exporting needs only the product (its EMA, if the run keeps one): that subtree
alone is restored, onto this host's devices in whatever layout they allow (orbax reads any sharding
from any writer), so a run trained on N processes exports on one with no more memory than the model
itself.
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import orbax.checkpoint as ocp
from etils import epath

from s2flash_jax.config import Config, ConfigError, read_run_config
from s2flash_jax.model_checkpoint import copy_components, extra_metadata, read_metadata, save_model
from s2flash_jax.outputs import refuse_existing_output
from s2flash_jax.parallel.mesh import MeshConfig, make_mesh, sharded_shapes, tree_shardings
from s2flash_jax.storage import PathLike, resolve
from s2flash_jax.train.state import RANDOM_TEACHER, initialiser

# model.json fields a student takes over from the checkpoint its components come from (its teacher's).
COMPONENT_METADATA = ("text_encoder", "autoencoder")


@dataclasses.dataclass(frozen=True)
class RunExport:
    step: int
    product: str  # the network exported ("student", or "teacher" for flow matching)
    ema: bool  # whether the EMA weights were exported
    model: epath.Path | None  # the model checkpoint written, if asked for
    diffusers: epath.Path | None  # the diffusers folder written, if asked for


def export_run(run_dir: PathLike, *, model: PathLike | None = None, diffusers: PathLike | None = None,
               step: int | None = None, components_from: PathLike | None = None, dtype: str | None = None,
               pipeline: PathLike | None = None, force: bool = False) -> RunExport:
    """Write the product of the run in `run_dir` at its newest checkpoint (or `step`) as a model
    checkpoint at `model` and/or a diffusers folder at `diffusers` (conversion/exporter.py; dtype and
    pipeline as `s2flash convert export` takes them).

    components_from: a model checkpoint whose components (text encoder, autoencoder) the export
    carries; default: the run's train.teacher_checkpoint, when it has any. Sampling defaults
    (guidance scale, flow shift) are the run's sample.* settings.
    """
    if model is None and diffusers is None:
        raise ConfigError("export: nothing to write; give --model CKPT and/or --diffusers DIR")
    if jax.process_count() > 1:
        raise ConfigError("export runs in one process: start it on one host (it restores a checkpoint written by "
                          "any number of processes onto that host's devices)")
    run_dir = resolve(run_dir)
    config = read_run_config(run_dir)
    for path in (model, diffusers):  # refused before minutes of restoring
        if path is not None:
            refuse_existing_output(path, force=force)
    source = _components_source(config, components_from)
    restored_step, product, ema, params = restore_product(config, run_dir, step)
    metadata = {**_component_metadata(source),
                "sampling": {"guidance_scale": config.sample.guidance_scale, "flow_shift": config.sample.flow_shift},
                "run": {"dir": str(run_dir), "step": restored_step, "weights": "ema" if ema else "trained"}}
    written_model = None
    with tempfile.TemporaryDirectory(prefix="s2flash-export-") as scratch:
        ckpt = resolve(model) if model is not None else epath.Path(scratch) / "model"
        save_model(ckpt, config.model, params, force=force, metadata=metadata,
                   write_components=None if source is None else copy_components(source, _component_dirs(source)))
        written_model = ckpt if model is not None else None
        if diffusers is not None:
            from conversion.exporter import export_checkpoint  # torch-free: safetensors written by conversion/

            export_checkpoint(ckpt, diffusers, dtype=dtype, pipeline=pipeline, force=force)
    return RunExport(restored_step, product, ema, written_model, None if diffusers is None else resolve(diffusers))


def restore_product(config: Config, run_dir: epath.Path, step: int | None = None):
    """(step, product name, whether EMA, params as nnx.State) of the run's checkpoint, only the
    product's subtree read, laid out over this process's devices (fsdp over all of them)."""
    from s2flash_jax.train.checkpoint import RunCheckpoints

    setup = initialiser(config)
    product = setup.recipe.product
    ema = product in setup.abstract.ema
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    abstract = setup.abstract.ema[product] if ema else setup.abstract.distill.params[product]
    target = sharded_shapes(abstract, tree_shardings(abstract, mesh))
    if not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir} has no checkpoints/ to export from")
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise ConfigError(f"{run_dir} has no checkpoint yet")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise ConfigError(f"{run_dir} has no checkpoint at step {step}; it has {', '.join(map(str, steps))}")
        # The product's subtree alone: orbax skips every other array of the state.
        item = {"ema": {product: target}} if ema else {"distill": {"params": {product: target}}}
        restored = checkpoints.manager.restore(chosen, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    finally:
        checkpoints.close()
    subtree = restored.state["ema"][product] if ema else restored.state["distill"]["params"][product]
    return chosen, product, ema, subtree


def _components_source(config: Config, components_from: PathLike | None) -> epath.Path | None:
    if components_from is not None:
        read_metadata(components_from)
        return resolve(components_from)
    teacher = config.train.teacher_checkpoint
    if teacher and teacher != RANDOM_TEACHER and resolve(teacher).is_dir():
        return resolve(teacher)
    return None


def _component_metadata(source: epath.Path | None) -> dict:
    if source is None:
        return {}
    return {k: v for k, v in extra_metadata(source).items() if k in COMPONENT_METADATA}


def _component_dirs(source: epath.Path) -> set[str]:
    """The directories of the source's components (metadata values that name one, e.g. text_encoder)."""
    return {v for v in _component_metadata(source).values() if isinstance(v, str)}
