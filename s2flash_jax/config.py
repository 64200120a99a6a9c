"""Run configuration: typed dataclasses, defined by Python files in configs/, overridden by dotted keys.

A config file defines `get_config(arg: str | None = None) -> Config`; `path.py:arg` passes `arg`
(variants come from the argument, not from copies of the file). Overrides are `section.key=value`
strings, parsed with the type of the field they set; the result is re-validated.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2flash_jax.data.pipeline import DataConfig
from s2flash_jax.models.backbone import BackboneConfig, architecture_class, architecture_to_json, kind_of
from s2flash_jax.parallel.mesh import MeshConfig
from s2flash_jax.precision import Precision
from s2flash_jax.recipes.registry import recipe_entries
from s2flash_jax.train.health import HealthConfig

RECIPES = tuple(recipe_entries())


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Few-step sampling settings. height/width are in latent pixels.

    guidance_scale feeds a student's guidance embedding (times model.guidance_embeds_scale);
    flow_shift warps a teacher's Euler schedule toward high noise (SANA: 3.0 at 1024 px) and moves a
    student's intermediate multistep times the same way (1: diffusers' uniform times).
    """

    steps: int = 4
    batch_size: int = 4
    height: int = 32
    width: int = 32
    guidance_scale: float = 4.5
    flow_shift: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "height", "width"):
            if getattr(self, key) < 1:
                raise ValueError(f"sample.{key}={getattr(self, key)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How `s2flash train` runs. Defaults are the SANA-Sprint yamls where they say.

    steps: global updates (each update is one phase of the recipe's cycle on one batch);
    batch_size: global examples per update, split over the mesh's (data, fsdp) devices.
    optimizer: "came" (SANA-Sprint) or "adamw" (b1 0.9, b2 0.999, eps 1e-8); both after global-norm
      clipping at clip_norm, with non-finite updates skipped and counted (at most
      max_consecutive_skips in a row). schedule: "constant", "cosine" or "linear" decay from
      learning_rate to end_learning_rate after warmup_steps of linear warm-up; schedules count each
      network's own updates (half the global steps when generator and discriminator alternate).
    ema_decay: 0 keeps no EMA student; otherwise ema = decay·ema + (1-decay)·student after every
      student update. teacher_dtype: "bfloat16" stores the frozen teacher in half the memory.
    teacher_checkpoint: a model checkpoint (s2flash_jax/model_checkpoint.py) holding the teacher to
      distil from, with config.teacher's architecture; a local path or a gs:// / s3:// URI. A
      distillation refuses to start without one; "random" asks for a randomly initialised teacher
      (smoke runs, benchmarks).
    init_checkpoint: a model checkpoint with config.model's architecture holding the starting
      weights of the trained network (the student of a distillation, the model of flow matching);
      `s2flash train --student-init`. When set, init_student_from_teacher is not used.
    init_student_from_teacher: the student starts as a copy of the teacher with its guidance
      embedder's output layer zero, so at step 0 it computes exactly the teacher.
    trainable: glob patterns over the trained network's '/'-joined parameter paths (e.g.
      "time_embed/*", "*/norm_q/*"); only matching parameters are updated, the others keep their
      values and hold no optimizer state. Empty: all.
    Every *_every is in global steps; 0 turns it off.
    """

    steps: int = 10_000
    batch_size: int = 32
    optimizer: str = "came"
    learning_rate: float = 2e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    end_learning_rate: float = 0.0
    clip_norm: float = 0.1
    weight_decay: float = 0.0
    max_consecutive_skips: int = 100
    ema_decay: float = 0.0
    teacher_dtype: str = "float32"
    teacher_checkpoint: str = ""
    init_checkpoint: str = ""
    init_student_from_teacher: bool = True
    trainable: Sequence[str] = ()
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0
    sample_count: int = 4

    def __post_init__(self):
        choices = {"optimizer": ("came", "adamw"), "schedule": ("constant", "cosine", "linear"),
                   "teacher_dtype": ("float32", "bfloat16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"train.{key}={getattr(self, key)!r}; expected one of {allowed}")
        for key in ("steps", "batch_size", "keep_checkpoints", "sample_count", "max_consecutive_skips"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("warmup_steps", "log_every", "checkpoint_every", "sample_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0")
        if not self.learning_rate > 0 or self.clip_norm <= 0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train: learning_rate ({self.learning_rate}) and clip_norm ({self.clip_norm}) must be "
                             f"> 0 and ema_decay ({self.ema_decay}) in [0, 1)")


@dataclasses.dataclass(frozen=True)
class PrepareTeacherConfig:
    """`s2flash prepare-teacher`: a SANA flow checkpoint -> a teacher SANA-Sprint can distil from.

    qk_norm, timestep_scale: what the prepared teacher gets (SANA-Sprint's: RMSNorm across heads on
    every attention's queries and keys, and the dense time embedding 0.001, with which the embedder
    is fed s instead of 1000·s). The converted weights are then fine-tuned with flow matching
    (flow_matching.* and train.* as for teacher training):
      embedding_steps: stage 1, only parameters matching embedding_trainable (the time embedding
        and the QK norms) train, at train.learning_rate after train.warmup_steps;
      full_steps: stage 2, every parameter, the learning rate warmed up from 0 over
        full_warmup_steps (all layers at once at full rate is where the reported loss spike is).
    eval_path: held-out records (a dataset as data.path takes) on which the prepared teacher's
      velocity is compared with the original's; empty: the training data in another order.
    eval_examples: how many; eval_times: flow times per example, (k + 1/2) / eval_times.
    """

    qk_norm: str | None = "rms_norm_across_heads"
    timestep_scale: float = 0.001
    embedding_steps: int = 1000
    embedding_trainable: Sequence[str] = ("time_embed/*", "*/norm_q/*", "*/norm_k/*")
    full_steps: int = 2000
    full_warmup_steps: int = 500
    eval_path: str = ""
    eval_examples: int = 64
    eval_times: int = 8

    def __post_init__(self):
        for key in ("embedding_steps", "full_steps", "full_warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"prepare_teacher.{key}={getattr(self, key)} must be >= 0")
        if self.eval_examples < 1 or self.eval_times < 1 or not self.timestep_scale > 0:
            raise ValueError(f"prepare_teacher: eval_examples ({self.eval_examples}) and eval_times "
                             f"({self.eval_times}) must be >= 1 and timestep_scale ({self.timestep_scale}) > 0")


@dataclasses.dataclass(frozen=True)
class _RunSections:
    """The sections every run has; Config adds one section per registered recipe."""

    model: BackboneConfig
    recipe: str = "sana_sprint"
    teacher: BackboneConfig | None = None
    precision: Precision = Precision()
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    health: HealthConfig = HealthConfig()
    prepare_teacher: PrepareTeacherConfig = PrepareTeacherConfig()
    seed: int = 0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}; expected one of {RECIPES}")
        kinds = {key: kind_of(getattr(self, key)).name for key in ("model", "teacher") if getattr(self, key) is not None}
        if len(set(kinds.values())) > 1:
            raise ValueError(f"model and teacher are of different kinds ({kinds}); a student is distilled from a "
                             "teacher of its own backbone")


# One section per recipe, named as it and holding its settings (recipes/registry.py), so that a
# recipe added to recipes/ is configurable (`sana_sprint.scm.p_mean=...`) without touching this file.
Config = dataclasses.make_dataclass(
    "Config", [(name, entry.settings, dataclasses.field(default=entry.settings()))
               for name, entry in recipe_entries().items()],
    bases=(_RunSections,), frozen=True)
Config.__module__ = __name__
Config.__doc__ = """A whole run. model is the network `sample` runs and `train` trains (the student; for the
flow_matching recipe, the teacher being trained); teacher is the frozen network a distillation
recipe distils from. recipe: one of RECIPES; its settings are the section of the same name."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> Config:
    """Load `path/to/config.py[:arg]` and apply `key.sub=value` overrides."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file {path_str!r} does not exist (expected a Python file such as configs/tiny.py)")
    module_spec = importlib.util.spec_from_file_location(f"s2flash_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path_str!r} defines no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{spec}: {e}") from e
    if not isinstance(config, Config):
        raise ConfigError(f"{path_str}: get_config returned {type(config).__name__}, expected s2flash_jax.config.Config")
    return apply_overrides(config, overrides)


RUN_CONFIG = "config.json"  # a run directory's resolved config (train/loop.py writes it)


def config_to_json(config: Config) -> dict[str, Any]:
    """The JSON object of `config` (a run directory's config.json): its dataclasses as objects,
    tuples as lists, and each architecture with its backbone kind ("kind")."""
    data = dataclasses.asdict(config)
    for key in ("model", "teacher"):
        if getattr(config, key) is not None:
            data[key] = architecture_to_json(getattr(config, key))
    return json.loads(json.dumps(data))


def config_from_json(data: dict[str, Any]) -> Config:
    """The Config whose `dataclasses.asdict` JSON is `data` (a run directory's config.json); keys the
    current code does not know are an error naming them."""
    try:
        return _dataclass_from_json(Config, data, "")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json does not describe a run this version can read: {e}") from e


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run directory was trained with (its config.json)."""
    from s2flash_jax.storage import resolve

    path = resolve(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory: it has no {RUN_CONFIG}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return config_from_json(data)


def _dataclass_from_json(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'the config'} should be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TypeError(f"unknown keys {', '.join(where + k for k in unknown)}")
    return cls(**{key: _value_from_json(hints[key], value, f"{where}{key}.") for key, value in data.items()})


def _value_from_json(field_type: Any, value: Any, where: str) -> Any:
    allowed = typing.get_args(field_type) if isinstance(field_type, types.UnionType) else (field_type,)
    if value is None:
        return None
    for t in allowed:
        if t is BackboneConfig:  # the kind says which architecture; none recorded: an older run's SANA
            return _dataclass_from_json(*architecture_class(value, where.rstrip(".")), where)
        if dataclasses.is_dataclass(t):
            return _dataclass_from_json(t, value, where)
        if typing.get_origin(t) in (tuple, collections.abc.Sequence) and isinstance(value, list):
            args = [a for a in typing.get_args(t) if a is not Ellipsis] or [Any]
            return tuple(_value_from_json(args[min(i, len(args) - 1)], v, where) for i, v in enumerate(value))
    return value


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            config = _set(config, key.split("."), raw, key)
        except ValueError as e:  # __post_init__ validation of the rebuilt section
            raise ConfigError(f"override {item!r}: {e}") from e
    return config


def _set(node: Any, parts: list[str], raw: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    head = parts[0]
    if head not in names:
        close = difflib.get_close_matches(head, names, n=1)
        prefix = full_key[: len(full_key) - len(".".join(parts))]
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {full_key!r}{hint}; keys here: {', '.join(names)}")
    current = getattr(node, head)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r}: {head!r} is a value, not a section")
        return dataclasses.replace(node, **{head: _set(current, parts[1:], raw, full_key)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full_key!r} is a section; set one of its keys, e.g. {full_key}."
                          f"{dataclasses.fields(current)[0].name}=...")
    field_type = typing.get_type_hints(type(node))[head]
    return dataclasses.replace(node, **{head: _parse(raw, field_type, full_key)})


def _parse(raw: str, field_type: Any, key: str) -> Any:
    allowed = typing.get_args(field_type) if isinstance(field_type, types.UnionType) else (field_type,)
    if raw.lower() == "none":
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r} cannot be None")
    for t in allowed:
        if typing.get_origin(t) in (tuple, collections.abc.Sequence):  # "4,4.5,5"
            (element, *_) = typing.get_args(t) or (str,)
            return tuple(_parse(item.strip(), element, key) for item in raw.split(",") if item.strip())
        if t is bool:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
        elif t in (int, float, str):
            try:
                return t(raw)
            except ValueError:
                pass
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {key!r} expects {names}, got {raw!r}")
