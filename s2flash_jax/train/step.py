"""The jitted training step: one phase update of the recipe plus EMA, with explicit shardings.

`train_step` is a pure function of (state, batch); `compile_steps` jits it once per phase with the
state's shardings in and out, the batch split over the (data, fsdp) devices and the state donated,
so an update never holds two copies of the parameters or optimizer moments.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from s2flash_jax.parallel.mesh import batch_sharding, sharded_shapes
from s2flash_jax.recipes.base import Metrics, Recipe
from s2flash_jax.train.flops import jaxpr_flops
from s2flash_jax.train.optim import skipped_updates
from s2flash_jax.train.state import TrainState, ema_update


def train_step(recipe: Recipe, ema_decay: float, phase: str, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
    """One update of the network `phase` trains. Metrics add "skipped_updates" (non-finite, so far)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    distill, metrics = recipe.phase_update(phase, state.distill, batch, key)
    trained = recipe.phases[phase].trains
    ema = state.ema
    if trained in ema:
        ema = {**ema, trained: ema_update(ema[trained], distill.params[trained], ema_decay)}
    metrics = {**metrics, "skipped_updates": skipped_updates(distill.opt_state)}
    return TrainState(distill=distill, ema=ema, key=state.key), metrics


def compile_steps(recipe: Recipe, shardings: TrainState, mesh: Mesh, ema_decay: float) -> dict[str, jax.stages.Wrapped]:
    """phase name -> jitted (state, batch) -> (state, metrics), state donated, metrics replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {phase: jax.jit(functools.partial(train_step, recipe, ema_decay, phase),
                           in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated),
                           donate_argnums=0)
            for phase in recipe.phases}


def abstract_batch(config, sharding: NamedSharding, latents: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a step of `config` (s2flash_jax.config.Config) takes, as shapes (captions
    only without `latents`)."""
    m, b, length = config.model, config.train.batch_size, config.data.caption_length
    batch = {"caption": jax.ShapeDtypeStruct((b, length, m.caption_channels), jnp.float32, sharding=sharding),
             "caption_mask": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=sharding)}
    if latents:
        batch["latents"] = jax.ShapeDtypeStruct((b, m.sample_size, m.sample_size, m.in_channels), jnp.float32,
                                                sharding=sharding)
    return batch


def compile_ahead(recipe: Recipe, shardings: TrainState, mesh: Mesh, config, abstract: TrainState,
                  log: Callable[[str], None] | None = None) -> tuple[dict[str, jax.stages.Compiled], dict[str, float]]:
    """(phase -> step compiled for abstract inputs, phase -> matrix FLOPs of one step per device).

    The compiled steps are callable like the jitted ones, and their memory analyses are known before
    the first batch. FLOPs are counted on the traced step (XLA's cost analysis counts the scanned
    blocks once) and split evenly over the mesh's devices.
    """
    state_spec = sharded_shapes(abstract, shardings)
    batch_spec = abstract_batch(config, batch_sharding(mesh), latents=recipe.needs_latents)
    compiled, flops = {}, {}
    for phase, fn in compile_steps(recipe, shardings, mesh, config.train.ema_decay).items():
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            traced = fn.trace(state_spec, batch_spec)
            compiled[phase] = traced.lower().compile()
        flops[phase] = jaxpr_flops(traced.jaxpr.jaxpr) / mesh.size
        if log:
            log(f"compiled the {phase} step in {time.perf_counter() - start:.1f}s")
    return compiled, flops


def step_peak_bytes(compiled: jax.stages.Compiled) -> int:
    """Bytes a compiled step holds at its peak per device, by XLA's memory analysis: its arguments,
    outputs and temporaries, less the outputs that reuse donated arguments."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
