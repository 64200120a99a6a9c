"""`s2flash train`: the distillation loop over a run directory.

RUN_DIR/
  config.json          the resolved config (a resumed run must match it, up to RESUMABLE_KEYS)
  forked_from.json     a fork's source: {"parent": PARENT_RUN_DIR, "step": N} (see train's fork_from)
  checkpoints/<step>/  orbax: train state, data-iterator position per process, metadata
  tensorboard/         event files (losses, gradient norms, step time, examples/s, MFU)
  samples/step_<n>.png periodic sample grid (rows: captions, columns: 1, 2, 4 student steps or
                       5, 10, 20 teacher steps)
  health.json          every health check (train/health.py), with its warnings; the first is the baseline

The same code runs on one CPU and on a pod: every process runs this loop, feeds its slice of each
global batch, and only process 0 prints or writes anything outside checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from s2flash_jax.config import Config, config_from_json, config_to_json
from s2flash_jax.data.pipeline import global_batch, train_batches
from s2flash_jax.model_checkpoint import save_model
from s2flash_jax.models.backbone import abstract_backbone
from s2flash_jax.outputs import OutputExists, image_grid, save_image
from s2flash_jax.parallel.mesh import batch_sharding, make_mesh, sharded_shapes, tree_shardings
from s2flash_jax.recipes.registry import recipe_entries
from s2flash_jax.sampling import few_step_sample, latent_preview
from s2flash_jax.storage import PathLike, is_nonempty_dir, resolve
from s2flash_jax.train.checkpoint import NoCheckpointRestores, RunCheckpoints
from s2flash_jax.train.health import HealthMonitor, held_out_batch
from s2flash_jax.train.metrics import MetricsLogger
from s2flash_jax.train.state import (
    TrainState, check_teacher_source, describe_initialisation, initialiser, product_params)
from s2flash_jax.train.step import compile_ahead, step_peak_bytes

# Config keys a resumed run may change: how long, how often, and how the work is laid out.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.sample_every", "mesh.", "data.num_workers", "data.prefetch_buffer", "health.")
# Config keys a fork may change besides: those its recipe's entry names (SD3.5-Flash's share of the
# student's timesteps, docs/sd35_flash.md) and the seed of its data stream, which starts afresh.
FORKABLE_KEYS = (*RESUMABLE_KEYS, *(f"{name}.{key}" for name, entry in recipe_entries().items()
                                    for key in entry.forkable), "seed")
FORKED_FROM = "forked_from.json"
SAMPLE_STEPS = (1, 2, 4)
STEP_MEMORY = "step_memory.json"  # in a run directory: its wall time and its compiled steps' peak memory
FLOW_SAMPLE_STEPS = (5, 10, 20)


class RunError(ValueError):
    """A run directory or run setup that cannot be used; the message says why."""


@dataclasses.dataclass
class RunResult:
    state: TrainState
    step: int
    history: list[dict[str, float]]
    losses: list[dict[str, float]]  # every update's metrics when record_losses, else empty
    product: str  # the trained network the run is for (recipe.product)
    step_peak_bytes: int = 0  # the largest compiled step's peak memory per device (train.step.step_peak_bytes)
    health: list[dict] = dataclasses.field(default_factory=list)  # this run's health checks (train/health.py)

    def export(self, config: Config, path: PathLike, **save_options) -> epath.Path:
        """Write the run's product (its EMA, if kept) as a model checkpoint; see model_checkpoint.save_model."""
        return save_model(path, config.model, product_params(self.state, self.product), **save_options)


def train(config: Config, out: PathLike, *, resume: bool = False, force: bool = False,
          stop_after: int | None = None, record_losses: bool = False, quiet: bool = False,
          fork_from: PathLike | None = None) -> RunResult:
    """Distil for config.train.steps global steps into `out`.

    resume: continue from the newest checkpoint that restores (from step 0 if there is none).
    force: delete an existing run directory first. stop_after: end this invocation after that many
    updates (with a checkpoint), as a preemption would. record_losses: keep every update's metrics
    on the host (tests compare runs with them).
    fork_from: a new run starts from that run directory's newest checkpoint (every network, optimizer
    state and frozen network, and its global step) instead of from scratch, and trains on to
    config.train.steps; its data stream starts afresh. The parent's config may differ only in
    FORKABLE_KEYS. Ignored when `out` is continued (a resumed fork restores its own checkpoints).
    """
    out = resolve(out)
    primary = jax.process_index() == 0
    check_teacher_source(config)
    mesh = make_mesh(config.mesh)
    _check_batch(config, mesh)
    continuing = _check_run_dir(config, out, resume=resume, force=force)
    setup = initialiser(config)  # checks the checkpoints it reads before anything is written
    _say(primary and not quiet and not resume and fork_from is None, describe_initialisation(config))
    shardings = tree_shardings(setup.abstract, mesh)
    target = sharded_shapes(setup.abstract, shardings)
    checkpoints = RunCheckpoints(out / "checkpoints", keep=config.train.keep_checkpoints) if continuing else None
    restored = checkpoints.restore_newest(target) if continuing and resume else None
    # The data continue where the restored run's took them, whatever its process count; a fork's start afresh.
    data_start = _data_batches(restored.meta, restored.step) if restored is not None else 0
    data_it = _data_iterator(config, config.train.batch_size, jax.process_index(), jax.process_count(),
                             latents=setup.recipe.needs_latents, start_batch=data_start)
    # A fresh run reads its first batch (and a fork its parent's state) before writing anything, so
    # bad input leaves no run behind.
    first_batch = None if continuing else next(data_it)
    forked = _fork(config, resolve(fork_from), out, target) if fork_from is not None and not continuing else None
    if not continuing and primary:
        _create_run_dir(config, out, forked)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("s2flash run directory ready")
    if checkpoints is None:
        checkpoints = RunCheckpoints(out / "checkpoints", keep=config.train.keep_checkpoints)
    if restored is None and continuing and (out / FORKED_FROM).is_file():
        # A fork stopped before its first checkpoint: it forks again, from the parent it recorded.
        forked = _fork(config, resolve(json.loads((out / FORKED_FROM).read_text())["parent"]), out, target)
        if primary:
            _record_fork(out, forked)
    if restored is not None:
        state, start = restored.state, restored.step
        _say(primary and not quiet, f"resumed from {out / 'checkpoints' / str(start)}")
    elif forked is not None:
        state, start = forked.state, forked.step
        _say(primary and not quiet, f"forked from {forked.parent} at step {start}")
    else:
        state, start = setup.create(mesh, shardings), 0

    recipe = setup.recipe
    data_sharding = batch_sharding(mesh)
    steps, flops = compile_ahead(recipe, shardings, mesh, config, setup.abstract,
                          log=print if primary and not quiet else None)
    end = config.train.steps if stop_after is None else min(config.train.steps, start + stop_after)
    logger = MetricsLogger(out / "tensorboard", total_steps=config.train.steps, start_step=start,
                           every=config.train.log_every, examples_per_step=config.train.batch_size,
                           flops_per_step=flops,
                           enabled=primary and not quiet)
    sampler = _Sampler(config, mesh, setup.recipe.product) if config.train.sample_every else None
    health = None
    if config.health.every:
        # A resumed run or a fork rebuilds the initial state (deterministic from the config) for θ_init.
        initial = state if restored is None and forked is None else setup.create(mesh, shardings)
        health = HealthMonitor(config, mesh, recipe.product, initial.distill.params[recipe.product],
                               out / "health.json")
        del initial
        if start == 0 or forked is not None:  # a fork's baseline is the state it starts from
            health.check(state, start, logger.writer, primary)
    losses: list[dict[str, float]] = []
    step = start
    try:
        with jax.set_mesh(mesh):
            while step < end:
                phase = recipe.phase_at(step).name
                local, first_batch = (next(data_it) if first_batch is None else first_batch), None
                batch = global_batch(local, data_sharding)
                state, metrics = steps[phase](state, batch)
                step += 1
                logger.record(step, phase, metrics)
                if health:
                    health.observe(metrics)
                    if step % config.health.every == 0:
                        health.check(state, step, logger.writer, primary)
                if record_losses:
                    losses.append({k: float(v) for k, v in jax.device_get(metrics).items()})
                if step == end or (config.train.checkpoint_every and step % config.train.checkpoint_every == 0):
                    checkpoints.save(step, state, {"step": step, "data_batches": data_start + step - start,
                                                   "config": config_to_json(config)})
                if sampler and step % config.train.sample_every == 0:
                    sampler.write(state, out / "samples" / f"step_{step:07d}.png", logger, step, primary)
    finally:
        data_it.close()
        checkpoints.wait()
        checkpoints.close()
        logger.close(step)
    _say(primary and not quiet, f"stopped at step {step} of {config.train.steps}; checkpoints in {out / 'checkpoints'}")
    return RunResult(state=state, step=step, history=logger.history, losses=losses, product=recipe.product,
                     step_peak_bytes=max(step_peak_bytes(c) for c in steps.values()),
                     health=health.history if health else [])


def train_and_export(name: str, config: Config, run_dir: PathLike, **export_options) -> epath.Path:
    """Train (or resume) the run in run_dir and export its product to run_dir/model (see
    RunResult.export for the options); skipped when that export exists. Records the run's wall time
    and step memory in run_dir/STEP_MEMORY. Returns the model checkpoint."""
    run_dir = resolve(run_dir)
    ckpt = run_dir / "model"
    if (ckpt / "model.json").is_file():
        print(f"{name}: {ckpt} exists, skipping")
        return ckpt
    print(f"{name}: {config.recipe} for {config.train.steps} steps in {run_dir}", flush=True)
    start = time.perf_counter()
    result = train(config, run_dir, resume=True)
    (run_dir / STEP_MEMORY).write_text(json.dumps({"step_peak_mb": result.step_peak_bytes / 2**20,
                                                   "train_s": time.perf_counter() - start}) + "\n")
    result.export(config, ckpt, force=True, **export_options)
    return ckpt


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)


def _check_batch(config: Config, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = config.train.batch_size
    if batch % shards or batch % jax.process_count():
        raise RunError(f"train.batch_size={batch} must divide evenly over the {shards} data x fsdp devices of "
                       f"mesh {dict(mesh.shape)} and the {jax.process_count()} processes")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"steps": 5}} -> {"train.steps": 5}."""
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat




def _changed_keys(saved: epath.Path, config: Config, allowed: tuple[str, ...]) -> list[str]:
    """The dotted keys in which `config` differs from the config.json `saved`, apart from `allowed`
    (a key, or a prefix ending in '.')."""
    old = _flatten(config_to_json(config_from_json(json.loads(saved.read_text()))))  # older files say less
    new = _flatten(config_to_json(config))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                  and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in allowed))


def _check_run_dir(config: Config, out: epath.Path, *, resume: bool, force: bool) -> bool:
    """Whether `out` is a run to continue; errors for a directory that may not be used as asked."""
    if not is_nonempty_dir(out):
        if out.exists() and not out.is_dir():
            raise OutputExists(f"run directory {str(out)!r} is a file; expected a directory")
        return False
    saved = out / "config.json"
    if resume and saved.is_file():
        changed = _changed_keys(saved, config, RESUMABLE_KEYS)
        if changed:
            raise RunError(f"cannot resume {out}: the config differs in {', '.join(changed)} "
                           f"(only {', '.join(RESUMABLE_KEYS)} may change); start a new run directory")
        return True
    if resume:
        raise RunError(f"cannot resume {out}: it has no config.json, so it is not a run directory")
    if not force:
        raise OutputExists(f"run directory {str(out)!r} already exists and is not empty; pass --resume to "
                           f"continue it or --force to delete it")
    return False


@dataclasses.dataclass
class _Forked:
    """Where a fork starts: its parent run directory, and the step and state restored from it."""

    parent: epath.Path
    step: int
    state: TrainState


def _fork(config: Config, parent: epath.Path, out: epath.Path, target: TrainState) -> _Forked:
    """The newest state of the run directory `parent` that restores onto `target` (the new run's
    shapes and shardings), checked to be one `config` may continue from `out`."""
    if parent == out:
        raise RunError(f"--fork {str(parent)!r} is the run directory being written; fork into another --out")
    if not (parent / "config.json").is_file():
        raise RunError(f"cannot fork {parent}: it has no config.json, so it is not a run directory")
    changed = _changed_keys(parent / "config.json", config, FORKABLE_KEYS)
    if changed:
        raise RunError(f"cannot fork {parent}: the config differs in {', '.join(changed)} "
                       f"(only {', '.join(FORKABLE_KEYS)} may change)")
    if not (parent / "checkpoints").is_dir():  # checked first: RunCheckpoints would create it
        raise RunError(f"cannot fork {parent}: it has no checkpoints/ to start from")
    checkpoints = RunCheckpoints(parent / "checkpoints", keep=config.train.keep_checkpoints)
    try:
        # The state alone, not a throwaway data iterator: the fork's data starts afresh from its own
        # seed, and its processes need not match the parent's (whose data positions stay unread).
        restored = checkpoints.restore_newest(target)
    except NoCheckpointRestores as e:
        raise RunError(f"cannot fork {parent}: {e}") from e
    finally:
        checkpoints.close()
    if restored is None:
        raise RunError(f"cannot fork {parent}: it has no checkpoint yet")
    if restored.step >= config.train.steps:
        raise RunError(f"cannot fork {parent} at step {restored.step} with train.steps={config.train.steps}: "
                       f"train.steps counts from the parent's step 0, so set it above {restored.step}")
    return _Forked(parent, restored.step, restored.state)


def _record_fork(out: epath.Path, forked: _Forked) -> None:
    record = {"parent": str(forked.parent), "step": forked.step}
    (out / FORKED_FROM).write_text(json.dumps(record, indent=2) + "\n")


def _create_run_dir(config: Config, out: epath.Path, forked: _Forked | None = None) -> None:
    """A new run directory holding only config.json and, for a fork, FORKED_FROM (written first, so
    that a fork's directory never has a config without it). An existing one was allowed by --force."""
    if out.exists():
        out.rmtree()
    out.mkdir(parents=True)
    if forked is not None:
        _record_fork(out, forked)
    (out / "config.json").write_text(json.dumps(config_to_json(config), indent=2) + "\n")


def _data_iterator(config: Config, batch_size: int, process_index: int, process_count: int, latents: bool,
                   start_batch: int = 0):
    """The training stream of `config` in global batches of batch_size from global batch start_batch,
    this process's rows (captions only without `latents`)."""
    m = config.model
    return train_batches(config.data, global_batch_size=batch_size, seed=config.seed,
                         latent_shape=(m.sample_size, m.sample_size, m.in_channels) if latents else None,
                         caption_length=config.data.caption_length, caption_dim=m.caption_channels,
                         process_index=process_index, process_count=process_count, start_batch=start_batch)


def _data_batches(meta: dict, step: int) -> int:
    """The global batches a checkpointed run had taken from its data. Checkpoints written before the
    position was recorded took one per step from step 0."""
    return int(meta.get("data_batches", step))


class _Sampler:
    """The periodic sample grid: the run's (EMA) product on fixed noise and the first captions of the
    data, a student with 1, 2 and 4 steps, a flow model with 5, 10 and 20 guided Euler steps.
    Latents are shown as their first three channels."""

    def __init__(self, config: Config, mesh, product: str):
        m = config.model
        self.product = product
        self.caption, self.mask, self.noise = held_out_batch(config, mesh, config.train.sample_count)
        replicated = NamedSharding(mesh, PartitionSpec())
        graphdef = nnx.graphdef(abstract_backbone(m, config.precision))
        guidance = config.sample.guidance_scale
        steps = SAMPLE_STEPS if m.few_step else FLOW_SAMPLE_STEPS

        def sample(params, null_caption, caption, mask, noise):
            model = nnx.merge(graphdef, params)
            return jnp.concatenate([few_step_sample(model, noise, caption, mask, jax.random.key(0), steps=n,
                                                    guidance_scale=guidance, null_caption=null_caption)
                                    for n in steps], axis=2)

        self.sample = jax.jit(sample, out_shardings=replicated)

    def write(self, state: TrainState, path: epath.Path, logger: MetricsLogger, step: int, primary: bool) -> None:
        params = product_params(state, self.product)
        latents = np.asarray(jax.device_get(self.sample(params, state.distill.frozen["null_caption"], self.caption,
                                                        self.mask, self.noise)))
        if not primary:
            return
        grid = image_grid(latent_preview(latents), columns=1)
        save_image(grid, path)
        if logger.writer is not None:
            logger.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
