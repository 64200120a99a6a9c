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

from s2flash_jax.model_checkpoint import CheckpointError, check_architecture, load_params
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.parallel.mesh import tree_shardings
from s2flash_jax.recipes.base import DistillState, Recipe
from s2flash_jax.recipes.flow_matching import flow_matching
from s2flash_jax.recipes.sana_sprint import discriminator_for, sana_sprint
from s2flash_jax.recipes.tbcm import tbcm
from s2flash_jax.recipes.twinflow import twinflow
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
    """recipe: the run's recipe (static); init: (teacher params or None) -> TrainState, traceable;
    abstract: its shapes; config: the run's Config (its train.teacher_checkpoint, if set, holds the
    frozen teacher's weights)."""

    recipe: Recipe
    init: Callable[[nnx.State | None], TrainState]
    abstract: TrainState
    config: Any

    def create(self, mesh: Mesh, shardings: TrainState) -> TrainState:
        """Run the initialisation with every leaf created directly in its shard (the teacher's weights
        read from its checkpoint straight into their shards)."""
        checkpoint, teacher_config = self.config.train.teacher_checkpoint, self.config.teacher
        if not checkpoint:
            with jax.set_mesh(mesh):
                return jax.jit(lambda: self.init(None), out_shardings=shardings)()
        # Outside the mesh context: there, NNX would read the logical axis names as mesh axes.
        abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(
            teacher_config, precision=self.config.precision, rngs=nnx.Rngs(0))))
        teacher = load_params(checkpoint, teacher_config, abstract, tree_shardings(abstract, mesh))
        with jax.set_mesh(mesh):
            return jax.jit(self.init, out_shardings=shardings)(teacher)


def _updates(steps: int, cycle: list[str], phase: str) -> int:
    """How often a phase runs in `steps` global steps: each network's schedule spans its own updates."""
    return math.ceil(steps * cycle.count(phase) / len(cycle))


def _null_caption(config, channels: int) -> jax.Array:
    """The unconditional caption teacher training and distillation pair: zeros [L, channels]."""
    return jnp.zeros((config.data.caption_length, channels), jnp.float32)


def _build_flow_matching(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    model = SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    return flow_matching(model, _null_caption(config, config.model.caption_channels), config=config.flow_matching,
                         optimizer=optimizer_from_config(config.train, config.train.steps))


def _student_and_teacher(config, seeds, teacher_params) -> tuple[SanaTransformer, SanaTransformer]:
    if config.teacher is None:
        raise ValueError("config.teacher is not set: distillation needs the teacher's architecture")
    student = SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    teacher = SanaTransformer(config.teacher, precision=config.precision, rngs=nnx.Rngs(seeds[1]))
    if teacher_params is not None:
        nnx.update(teacher, teacher_params)
    return student, teacher


def _distilled_from_teacher(config, distill: DistillState) -> DistillState:
    """The student started from the teacher's weights (unless the config says not), the teacher stored
    in train.teacher_dtype."""
    if config.train.init_student_from_teacher:
        distill = distill.replace(params={**distill.params, "student": copy_shared(
            distill.frozen["teacher"], distill.params["student"])})
    if config.train.teacher_dtype == "bfloat16":
        distill = distill.replace(frozen={**distill.frozen, "teacher": jax.tree.map(
            lambda x: x.astype(jnp.bfloat16), distill.frozen["teacher"])})
    return distill


def _build_tbcm(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    recipe, distill = tbcm(student, teacher, _null_caption(config, config.teacher.caption_channels),
                           config=config.tbcm, optimizer=optimizer_from_config(config.train, config.train.steps))
    return recipe, _distilled_from_teacher(config, distill)


def _build_sana_sprint(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    heads = discriminator_for(teacher, config.sana_sprint, rngs=nnx.Rngs(seeds[2]))
    cycle = list(config.sana_sprint.cycle)
    optimizers = {net: optimizer_from_config(config.train, _updates(config.train.steps, cycle, phase))
                  for net, phase in (("student", "generator"), ("discriminator", "discriminator"))}
    recipe, distill = sana_sprint(student, teacher, heads, _null_caption(config, config.teacher.caption_channels),
                                  config=config.sana_sprint, optimizers=optimizers)
    return recipe, _distilled_from_teacher(config, distill)


def _build_twinflow(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """TwinFlow keeps no teacher: the flow model (config.teacher) only gives the student its weights."""
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    if config.train.init_student_from_teacher:
        nnx.update(student, copy_shared(nnx.state(teacher), nnx.state(student)))
    return twinflow(student, _null_caption(config, config.model.caption_channels), config=config.twinflow,
                    optimizer=optimizer_from_config(config.train, config.train.steps))


BUILDERS = {"sana_sprint": _build_sana_sprint, "tbcm": _build_tbcm, "twinflow": _build_twinflow,
            "flow_matching": _build_flow_matching}


def _build(config, teacher_params: nnx.State | None = None) -> tuple[Recipe, TrainState]:
    """The config's recipe over freshly initialised networks (the teacher's weights given, if any).
    config: s2flash_jax.config.Config."""
    seeds = jax.random.split(jax.random.key(config.seed), 4)
    recipe, distill = BUILDERS[config.recipe](config, seeds, teacher_params)
    product = recipe.product
    ema = {product: jax.tree.map(jnp.copy, distill.params[product])} if config.train.ema_decay else {}
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
    """Trace the initialisation once without computing anything. A train.teacher_checkpoint is
    checked against config.teacher here, before any run writes anything."""
    box: dict[str, Recipe] = {}

    def init(teacher_params: nnx.State | None = None) -> TrainState:
        recipe, state = _build(config, teacher_params)
        box.setdefault("recipe", recipe)
        return state

    abstract = jax.eval_shape(init)
    checkpoint = config.train.teacher_checkpoint
    if checkpoint:
        if config.recipe == "flow_matching":
            raise CheckpointError(f"train.teacher_checkpoint is set but recipe {config.recipe!r} has no teacher")
        check_architecture(checkpoint, config.teacher)
    return Initialiser(box["recipe"], init, abstract, config)


def create_train_state(config, mesh: Mesh) -> tuple[Recipe, TrainState, TrainState]:
    """(recipe, state, shardings): the initial state laid out on `mesh` as the rules table says."""
    setup = initialiser(config)
    shardings = tree_shardings(setup.abstract, mesh)
    return setup.recipe, setup.create(mesh, shardings), shardings


def product_params(state: TrainState, name: str) -> Any:
    """The parameters a run delivers for network `name`: its EMA if the run keeps one."""
    return state.ema.get(name, state.distill.params[name])


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """decay·ema + (1 - decay)·params, leaf by leaf."""
    return optax.incremental_update(params, ema, 1.0 - decay)
