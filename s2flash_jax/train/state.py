"""The training state of a run as one pytree, created directly in its shards.

`TrainState` holds the recipe's `DistillState` (student and discriminator parameters and optimizer
states, the frozen teacher, spectral-norm vectors, step) plus the EMA student and the run's base
PRNG key. `create_train_state` traces the whole initialisation once abstractly, derives every
leaf's sharding from the logical axis names its variable carries (parallel/axes.py), and runs it
under jit with those out_shardings: no process ever holds an unsharded copy of any network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from s2flash_jax.config import ConfigError
from s2flash_jax.model_checkpoint import CheckpointError, check_architecture, load_params, read_model_config
from s2flash_jax.models.backbone import abstract_backbone
from s2flash_jax.parallel.mesh import tree_shardings
from s2flash_jax.recipes.base import DistillState, Recipe
from s2flash_jax.recipes.common import copy_shared
from s2flash_jax.recipes.registry import recipe_entry


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
    """recipe: the run's recipe (static); init: (loaded weights by role) -> TrainState, traceable;
    abstract: its shapes; config: the run's Config (train.teacher_checkpoint: the frozen teacher's
    weights, "teacher"; train.init_checkpoint: the trained network's starting weights, "initial")."""

    recipe: Recipe
    init: Callable[[dict[str, nnx.State]], TrainState]
    abstract: TrainState
    config: Any

    def create(self, mesh: Mesh, shardings: TrainState) -> TrainState:
        """Run the initialisation with every leaf created directly in its shard (checkpointed weights
        read straight into their shards)."""
        train = self.config.train
        # The initial weights are read as stored: a checkpoint without LoRA adapters may start a model with them.
        teacher = "" if train.teacher_checkpoint == RANDOM_TEACHER else train.teacher_checkpoint
        sources = {"teacher": (teacher, lambda: self.config.teacher),
                   "initial": (train.init_checkpoint, lambda: read_model_config(train.init_checkpoint))}
        loaded = {role: self._load(path, model(), mesh) for role, (path, model) in sources.items() if path}
        with jax.set_mesh(mesh):
            return jax.jit(self.init, out_shardings=shardings)(loaded)

    def _load(self, path: str, model, mesh: Mesh) -> nnx.State:
        # Outside the mesh context: there, NNX would read the logical axis names as mesh axes.
        abstract = nnx.state(abstract_backbone(model, self.config.precision))
        return load_params(path, model, abstract, tree_shardings(abstract, mesh))


# train.teacher_checkpoint's value for a deliberately random teacher: smoke runs, benchmarks, tests.
RANDOM_TEACHER = "random"


def needs_teacher_checkpoint(config) -> bool:
    """Whether the run would start from meaningless weights without train.teacher_checkpoint: every
    distillation (its frozen teacher), and TwinFlow when the teacher gives the student its weights."""
    role = recipe_entry(config.recipe).teacher
    if role == "initialises":
        return config.train.init_student_from_teacher and not config.train.init_checkpoint
    return role == "frozen"


def check_teacher_source(config) -> None:
    """ConfigError for a run that needs a teacher checkpoint and names none: distilling from a random
    teacher wastes a pod-day and still "trains"."""
    if needs_teacher_checkpoint(config) and not config.train.teacher_checkpoint:
        raise ConfigError(
            f"recipe {config.recipe!r} distils from a teacher, but train.teacher_checkpoint is not set: pass "
            f"--teacher CKPT (a model checkpoint from `s2flash convert import`, `s2flash prepare-teacher` or a "
            f"flow-matching run's export), or train.teacher_checkpoint={RANDOM_TEACHER} for a smoke run with a "
            f"randomly initialised teacher")


def _build(config, loaded: dict[str, nnx.State]) -> tuple[Recipe, TrainState]:
    """The config's recipe over freshly initialised networks, with the weights `loaded` from
    checkpoints (see Initialiser). config: s2flash_jax.config.Config."""
    seeds = jax.random.split(jax.random.key(config.seed), 4)
    recipe, distill = recipe_entry(config.recipe).build(config, seeds, loaded.get("teacher"))
    product = recipe.product
    if "initial" in loaded:
        distill = distill.replace(params={**distill.params, product: copy_shared(
            loaded["initial"], distill.params[product])})
    ema = {product: jax.tree.map(jnp.copy, distill.params[product])} if config.train.ema_decay else {}
    return recipe, TrainState(distill=distill, ema=ema, key=jax.random.key_data(seeds[3]))


def describe_initialisation(config) -> str:
    """One line saying where the trained network's starting weights come from."""
    train = config.train
    if train.init_checkpoint:
        return f"{config.recipe}: the trained network starts from {train.init_checkpoint}"
    if recipe_entry(config.recipe).teacher != "none" and train.init_student_from_teacher:
        teacher = ("the randomly initialised teacher (train.teacher_checkpoint=random)"
                   if train.teacher_checkpoint == RANDOM_TEACHER else train.teacher_checkpoint)
        return (f"{config.recipe}: the student starts as a copy of {teacher}"
                + (", its guidance embedder's output layer zero" if config.model.guidance_embeds else ""))
    return f"{config.recipe}: the trained network starts from random weights (seed {config.seed})"


def initialiser(config) -> Initialiser:
    """Trace the initialisation once without computing anything. A train.teacher_checkpoint is
    checked against config.teacher here, before any run writes anything."""
    box: dict[str, Recipe] = {}

    def init(loaded: dict[str, nnx.State]) -> TrainState:
        recipe, state = _build(config, loaded)
        box.setdefault("recipe", recipe)
        return state

    try:
        abstract = jax.eval_shape(init, {})
    except ValueError as e:  # the recipe's own checks of the networks and settings it is given
        raise ConfigError(f"the config does not make a {config.recipe} run: {e}") from e
    checkpoint = config.train.teacher_checkpoint
    if checkpoint:
        if recipe_entry(config.recipe).teacher == "none":
            raise CheckpointError(f"train.teacher_checkpoint is set but recipe {config.recipe!r} has no teacher")
        if checkpoint != RANDOM_TEACHER:
            check_architecture(checkpoint, config.teacher)
    if config.train.init_checkpoint:
        # Adapters the checkpoint lacks start at their initialisation (B = 0: the same function).
        check_architecture(config.train.init_checkpoint, config.model,
                           ignoring=type(config.model).LORA_KEYS if not read_model_config(config.train.init_checkpoint).lora_rank
                           else ())
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
