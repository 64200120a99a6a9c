"""The training state of a run as one pytree, created directly in its shards.

`TrainState` holds the recipe's `DistillState` (student and discriminator parameters and optimizer
states, the frozen teacher, spectral-norm vectors, step) plus the EMA student and the run's base
PRNG key. `create_train_state` traces the whole initialisation once abstractly, derives every
leaf's sharding from the logical axis names its variable carries (parallel/axes.py), and runs it
under jit with those out_shardings: no process ever holds an unsharded copy of any network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.parallel.mesh import tree_shardings
from s2flash_jax.recipes.base import DistillState, Recipe
from s2flash_jax.recipes.sana_sprint import discriminator_for, sana_sprint
from s2flash_jax.train.optim import optimizer_from_config


@struct.dataclass
class TrainState:
    """distill: the recipe's state; ema: EMA copies of trained networks by name ({} without EMA);
    key: [2] uint32 base key data: the update at step s draws from fold_in(key, s), so a resumed run
    draws exactly what an uninterrupted one would."""

    distill: DistillState
    ema: dict[str, Any]
    key: jax.Array

    @property
    def step(self) -> jax.Array:
        return self.distill.step


@dataclasses.dataclass(frozen=True)
class Initialiser:
    """recipe: the run's recipe (static); init: () -> TrainState, traceable; abstract: its shapes."""

    recipe: Recipe
    init: Callable[[], TrainState]
    abstract: TrainState

    def create(self, mesh: Mesh, shardings: TrainState) -> TrainState:
        """Run the initialisation with every leaf created directly in its shard."""
        with jax.set_mesh(mesh):
            return jax.jit(self.init, out_shardings=shardings)()


def _build(config) -> tuple[Recipe, TrainState]:
    """The SANA-Sprint recipe over freshly initialised networks. config: s2flash_jax.config.Config."""
    if config.teacher is None:
        raise ValueError("config.teacher is not set: distillation needs the teacher's architecture")
    seeds = jax.random.split(jax.random.key(config.seed), 4)
    student = SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    teacher = SanaTransformer(config.teacher, precision=config.precision, rngs=nnx.Rngs(seeds[1]))
    heads = discriminator_for(teacher, config.sana_sprint, rngs=nnx.Rngs(seeds[2]))
    null_caption = jnp.zeros((config.data.caption_length, config.teacher.caption_channels), jnp.float32)
    # Each network is updated only in its phase of the cycle; its schedule spans its share of the steps.
    cycle = list(config.sana_sprint.cycle)
    updates = {net: math.ceil(config.train.steps * cycle.count(phase) / len(cycle))
               for net, phase in (("student", "generator"), ("discriminator", "discriminator"))}
    optimizers = {net: optimizer_from_config(config.train, n) for net, n in updates.items()}
    recipe, distill = sana_sprint(student, teacher, heads, null_caption, config=config.sana_sprint,
                                  optimizers=optimizers)
    if config.train.init_student_from_teacher:
        distill = distill.replace(params={**distill.params, "student": copy_shared(
            distill.frozen["teacher"], distill.params["student"])})
    if config.train.teacher_dtype == "bfloat16":
        distill = distill.replace(frozen={**distill.frozen, "teacher": jax.tree.map(
            lambda x: x.astype(jnp.bfloat16), distill.frozen["teacher"])})
    ema = {"student": jax.tree.map(jnp.copy, distill.params["student"])} if config.train.ema_decay else {}
    return recipe, TrainState(distill=distill, ema=ema, key=jax.random.key_data(seeds[3]))


def copy_shared(source: nnx.State, target: nnx.State) -> nnx.State:
    """target with every parameter that `source` has at the same path and shape replaced by it.

    SANA-Sprint starts the student from its teacher: all shared weights are the teacher's, the
    student-only parts (guidance embedder, logvar head) keep their initialisation.
    """
    flat_source = dict(nnx.to_flat_state(source))
    flat = [(path, flat_source[path].replace(flat_source[path].get_value().astype(var.get_value().dtype))
             if path in flat_source and flat_source[path].get_value().shape == var.get_value().shape else var)
            for path, var in nnx.to_flat_state(target)]
    return nnx.from_flat_state(flat)


def initialiser(config) -> Initialiser:
    """Trace the initialisation once without computing anything."""
    box: dict[str, Recipe] = {}

    def init() -> TrainState:
        recipe, state = _build(config)
        box.setdefault("recipe", recipe)
        return state

    abstract = jax.eval_shape(init)
    return Initialiser(box["recipe"], init, abstract)


def create_train_state(config, mesh: Mesh) -> tuple[Recipe, TrainState, TrainState]:
    """(recipe, state, shardings): the initial state laid out on `mesh` as the rules table says."""
    setup = initialiser(config)
    shardings = tree_shardings(setup.abstract, mesh)
    return setup.recipe, setup.create(mesh, shardings), shardings


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """decay·ema + (1 - decay)·params, leaf by leaf."""
    return optax.incremental_update(params, ema, 1.0 - decay)
