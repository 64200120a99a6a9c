"""The training state of a run as one pytree, created directly in its shards.

`TrainState` holds the recipe's `DistillState` (student and discriminator parameters and optimizer
states, the frozen teacher, spectral-norm vectors, step) plus the EMA student and the run's base
PRNG key. `create_train_state` traces the whole initialisation once abstractly, derives every
leaf's sharding from the logical axis names its variable carries (parallel/axes.py), and runs it
under jit with those out_shardings: no process ever holds an unsharded copy of any network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from s2flash_jax.config import ConfigError
from s2flash_jax.model_checkpoint import CheckpointError, check_architecture, load_params, read_model_config
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from s2flash_jax.parallel.mesh import tree_shardings
from s2flash_jax.recipes.base import DistillState, Recipe, phase_count
from s2flash_jax.recipes.flow_matching import flow_matching
from s2flash_jax.recipes.lcm import lcm
from s2flash_jax.recipes.s2flash import conv_discriminator_for, s2flash
from s2flash_jax.recipes.sana_sprint import discriminator_for, sana_sprint
from s2flash_jax.recipes.sd35_flash import sd35_flash
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
        abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(
            model, precision=self.config.precision, rngs=nnx.Rngs(0))))
        return load_params(path, model, abstract, tree_shardings(abstract, mesh))


# train.teacher_checkpoint's value for a deliberately random teacher: smoke runs, benchmarks, tests.
RANDOM_TEACHER = "random"


def needs_teacher_checkpoint(config) -> bool:
    """Whether the run would start from meaningless weights without train.teacher_checkpoint: every
    distillation (its frozen teacher), and TwinFlow when the teacher gives the student its weights."""
    if config.recipe == "flow_matching":
        return False
    if config.recipe == "twinflow":
        return config.train.init_student_from_teacher and not config.train.init_checkpoint
    return True


def check_teacher_source(config) -> None:
    """ConfigError for a run that needs a teacher checkpoint and names none: distilling from a random
    teacher wastes a pod-day and still "trains"."""
    if needs_teacher_checkpoint(config) and not config.train.teacher_checkpoint:
        raise ConfigError(
            f"recipe {config.recipe!r} distils from a teacher, but train.teacher_checkpoint is not set: pass "
            f"--teacher CKPT (a model checkpoint from `s2flash convert import`, `s2flash prepare-teacher` or a "
            f"flow-matching run's export), or train.teacher_checkpoint={RANDOM_TEACHER} for a smoke run with a "
            f"randomly initialised teacher")


def _product_optimizer(config, updates: int | None = None) -> optax.GradientTransformation:
    """The optimizer of the network the run is for: train.trainable applies to it alone."""
    return optimizer_from_config(config.train, config.train.steps if updates is None else updates,
                                 config.train.trainable)


def _null_caption(config, channels: int) -> jax.Array:
    """The unconditional caption teacher training and distillation pair: zeros [L, channels]."""
    return jnp.zeros((config.data.caption_length, channels), jnp.float32)


def _build_flow_matching(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    model = SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(seeds[0]))
    return flow_matching(model, _null_caption(config, config.model.caption_channels), config=config.flow_matching,
                         optimizer=_product_optimizer(config))


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
        distill = distill.replace(params={**distill.params, "student": student_from_teacher(
            distill.frozen["teacher"], distill.params["student"])})
    if config.train.teacher_dtype == "bfloat16":
        distill = distill.replace(frozen={**distill.frozen, "teacher": jax.tree.map(
            lambda x: x.astype(jnp.bfloat16), distill.frozen["teacher"])})
    return distill


def _student_only(recipe_fn):
    """The builder of a recipe that trains the student alone (TBCM, LCM): its settings are the
    config section named as the recipe."""

    def build(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
        student, teacher = _student_and_teacher(config, seeds, teacher_params)
        recipe, distill = recipe_fn(student, teacher, _null_caption(config, config.teacher.caption_channels),
                                    config=getattr(config, config.recipe), optimizer=_product_optimizer(config))
        return recipe, _distilled_from_teacher(config, distill)

    return build


def _build_sana_sprint(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    heads = discriminator_for(teacher, config.sana_sprint, rngs=nnx.Rngs(seeds[2]))
    recipe, distill = sana_sprint(student, teacher, heads, _null_caption(config, config.teacher.caption_channels),
                                  config=config.sana_sprint,
                                  optimizers=_student_and_partner_optimizers(config, config.sana_sprint.cycle))
    return recipe, _distilled_from_teacher(config, distill)


def _student_and_partner_optimizers(config, cycle, partners: Sequence[str] = ("discriminator",),
                                    stages=()) -> dict[str, optax.GradientTransformation]:
    """The student's optimizer and its partner networks' (a discriminator, SD3.5-Flash's fake score,
    each trained by the phase of the same name), each scheduled over its own share of the (staged)
    cycle: recipes/base.phase_count."""
    steps = config.train.steps
    return {"student": _product_optimizer(config, phase_count(steps, cycle, "generator", stages)),
            **{name: optimizer_from_config(config.train, phase_count(steps, cycle, name, stages))
               for name in partners}}


def _build_s2flash(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """The step set is placed by sample.flow_shift, so the student trains at the times it is sampled at."""
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    heads = conv_discriminator_for(teacher.config, config.s2flash, rngs=nnx.Rngs(seeds[2]))
    recipe, distill = s2flash(student, teacher, heads, _null_caption(config, config.teacher.caption_channels),
                              config=config.s2flash, shift=config.sample.flow_shift,
                              optimizers=_student_and_partner_optimizers(config, config.s2flash.cycle))
    return recipe, _distilled_from_teacher(config, distill)


def _build_sd35_flash(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """The step set is placed by sample.flow_shift, as S2-Flash's; the fake score starts as the teacher."""
    cfg = config.sd35_flash
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    heads = conv_discriminator_for(teacher.config, cfg, rngs=nnx.Rngs(seeds[2])) if cfg.adversarial else None
    partners = ("fake_score", "discriminator") if cfg.adversarial else ("fake_score",)
    recipe, distill = sd35_flash(student, teacher, _null_caption(config, config.teacher.caption_channels),
                                 config=cfg, shift=config.sample.flow_shift, discriminator=heads,
                                 optimizers=_student_and_partner_optimizers(config, cfg.cycle, partners, cfg.stages))
    return recipe, _distilled_from_teacher(config, distill)


def _build_twinflow(config, seeds, teacher_params) -> tuple[Recipe, DistillState]:
    """TwinFlow keeps no teacher: the flow model (config.teacher) only gives the student its weights."""
    student, teacher = _student_and_teacher(config, seeds, teacher_params)
    if config.train.init_student_from_teacher:
        nnx.update(student, student_from_teacher(nnx.state(teacher), nnx.state(student)))
    return twinflow(student, _null_caption(config, config.model.caption_channels), config=config.twinflow,
                    optimizer=_product_optimizer(config))


BUILDERS = {"sana_sprint": _build_sana_sprint, "tbcm": _student_only(tbcm), "lcm": _student_only(lcm),
            "twinflow": _build_twinflow, "s2flash": _build_s2flash, "sd35_flash": _build_sd35_flash,
            "flow_matching": _build_flow_matching}


def _build(config, loaded: dict[str, nnx.State]) -> tuple[Recipe, TrainState]:
    """The config's recipe over freshly initialised networks, with the weights `loaded` from
    checkpoints (see Initialiser). config: s2flash_jax.config.Config."""
    seeds = jax.random.split(jax.random.key(config.seed), 4)
    recipe, distill = BUILDERS[config.recipe](config, seeds, loaded.get("teacher"))
    product = recipe.product
    if "initial" in loaded:
        distill = distill.replace(params={**distill.params, product: copy_shared(
            loaded["initial"], distill.params[product])})
    ema = {product: jax.tree.map(jnp.copy, distill.params[product])} if config.train.ema_decay else {}
    return recipe, TrainState(distill=distill, ema=ema, key=jax.random.key_data(seeds[3]))


# A student started from its teacher gets these of its own parameters zeroed, so that at step 0 it
# computes exactly the teacher's velocity, whatever its guidance input. Only the guidance embedder's
# output layer: zeroing its input layer too (diffusers' training script zeroes all four tensors)
# leaves silu(0) = 0 between the two, and neither would ever get a gradient. The logvar head, which
# weights the sCM loss and does not enter the velocity, keeps its xavier initialisation: zeroed, it
# made the shapes student's 1-step Fréchet distance 132 instead of 35 (docs/teacher.md).
ZEROED_IN_A_NEW_STUDENT = ("time_embed/guidance_embedder/linear_2/",)


def student_from_teacher(teacher: nnx.State, student: nnx.State) -> nnx.State:
    """The student with every parameter it shares with the teacher copied (copy_shared) and its
    guidance embedder's output layer zero (ZEROED_IN_A_NEW_STUDENT)."""
    flat = [(path, var.replace(jnp.zeros_like(var.get_value()))
             if "/".join(map(str, path)).startswith(ZEROED_IN_A_NEW_STUDENT) else var)
            for path, var in nnx.to_flat_state(copy_shared(teacher, student))]
    return nnx.from_flat_state(flat)


def describe_initialisation(config) -> str:
    """One line saying where the trained network's starting weights come from."""
    train = config.train
    if train.init_checkpoint:
        return f"{config.recipe}: the trained network starts from {train.init_checkpoint}"
    if config.recipe != "flow_matching" and train.init_student_from_teacher:
        teacher = ("the randomly initialised teacher (train.teacher_checkpoint=random)"
                   if train.teacher_checkpoint == RANDOM_TEACHER else train.teacher_checkpoint)
        return (f"{config.recipe}: the student starts as a copy of {teacher}"
                + (", its guidance embedder's output layer zero" if config.model.guidance_embeds else ""))
    return f"{config.recipe}: the trained network starts from random weights (seed {config.seed})"


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
        if config.recipe == "flow_matching":
            raise CheckpointError(f"train.teacher_checkpoint is set but recipe {config.recipe!r} has no teacher")
        if checkpoint != RANDOM_TEACHER:
            check_architecture(checkpoint, config.teacher)
    if config.train.init_checkpoint:
        # Adapters the checkpoint lacks start at their initialisation (B = 0: the same function).
        check_architecture(config.train.init_checkpoint, config.model,
                           ignoring=SanaConfig.LORA_KEYS if not read_model_config(config.train.init_checkpoint).lora_rank
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
