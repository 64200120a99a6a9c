"""The Backbone protocol: everything the engine (recipes, sampling, health checks, quantization,
LoRA, plan, prepare-teacher, export) needs of a denoiser, and the one registry that maps a model
kind, recorded in a run's config and in a checkpoint's model.json, to its config class, module and
converters. A backbone's own files are the only ones that name its classes.

Conventions every backbone follows (SANA's, which the recipes were written against):
  x: [B, H, W, C_in] latents; s: [B] (or scalar) flow time in [0, 1], 1 = noise (signed for a
  twin branch: negative time is the twin); caption: [B, L, caption_channels] text tokens with
  caption_mask [B, L] (1 = token); the output is the flow velocity [B, H, W, C_out] in float32.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
from flax import nnx

from s2flash_jax.precision import Precision

# Capabilities a recipe may need of a backbone (BackboneKind.capabilities).
GUIDANCE_EMBEDDING = "guidance_embedding"  # a guidance-scale input (SANA-Sprint students)
LOGVAR_HEAD = "logvar_head"                # sCM's adaptive weighting head (return_logvar=True)
TWIN_BRANCH = "twin_branch"                # TwinFlow's target-time and negative-time embeddings
BLOCK_FEATURES = "block_features"          # token features after chosen blocks (LADD / conv heads)
CAPABILITIES = (GUIDANCE_EMBEDDING, LOGVAR_HEAD, TWIN_BRANCH, BLOCK_FEATURES)


class BackboneConfig(Protocol):
    """What the engine reads of a backbone's architecture (a frozen dataclass).

    guidance_embeds / logvar_head / twinflow_embeds switch a capability on in this model (False
    where the kind lacks it); lora_rank: 0 without LoRA adapters. EXECUTION_KEYS: keys that say how
    the model runs, not what it computes (checkpoints need not agree on them); LORA_KEYS: the keys a
    model with adapters may differ in from the checkpoint it starts from.
    """

    EXECUTION_KEYS: ClassVar[tuple[str, ...]]
    LORA_KEYS: ClassVar[tuple[str, ...]]
    in_channels: int
    caption_channels: int
    sample_size: int
    patch_size: int
    num_layers: int
    guidance_embeds: bool
    guidance_embeds_scale: float
    logvar_head: bool
    twinflow_embeds: bool
    lora_rank: int

    @property
    def inner_dim(self) -> int: ...  # the token width D

    @property
    def output_channels(self) -> int: ...

    @property
    def few_step(self) -> bool: ...  # a distilled student (guidance embedding or twin branch)

    @property
    def flow_time_scale(self) -> float: ...  # the time embedder's units per unit of s


@runtime_checkable
class Backbone(Protocol):
    """A denoiser (an nnx.Module built as `kind.module(config, precision=..., rngs=...)`).

    __call__(x, s, caption, caption_mask=None, guidance=None, target_s=None, *, pooled=None,
             return_logvar=False)
      -> velocity [B, H, W, C_out] float32, and logvar [B] float32 with return_logvar=True.
      guidance: [B] the guidance input, required iff config.guidance_embeds; target_s: [B] the time
      a twin-branch model's average velocity jumps to, required iff config.twinflow_embeds;
      pooled: [B, P] pooled text embeddings, for backbones that take them (MMDiT); None elsewhere.
    block_features(x, s, caption, ..., *, block_ids) -> [[B, N, D]] token features after each block
      in block_ids (0-based), in that order; only where the kind has BLOCK_FEATURES.
    """

    config: Any

    def __call__(self, x: jax.Array, s: jax.Array, caption: jax.Array, caption_mask: jax.Array | None = None,
                 guidance: jax.Array | None = None, target_s: jax.Array | None = None, *,
                 pooled: jax.Array | None = None, return_logvar: bool = False) -> Any: ...

    def block_features(self, x: jax.Array, s: jax.Array, caption: jax.Array,
                       caption_mask: jax.Array | None = None, guidance: jax.Array | None = None,
                       target_s: jax.Array | None = None, *, block_ids: Sequence[int]) -> list[jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """name: the kind recorded in configs and model.json; config_class: its architecture dataclass;
    module: (config, *, precision, rngs) -> Backbone; capabilities: which of CAPABILITIES it can have;
    zeroed_in_new_student: '/'-joined parameter path prefixes a student copied from its teacher gets
    zeroed, so that at step 0 it computes exactly the teacher whatever its own inputs; lora_targets:
    the layer names LoRA adapters may target; quantization_keep: layer patterns `s2flash quantize`
    keeps in full precision by default; sensitivity_groups: the layer groups a quantization
    sensitivity sweep quantizes one at a time; converters: the import path of the module converting
    it to and from diffusers ("" where there is none)."""

    name: str
    config_class: type
    module: Callable[..., Backbone]
    capabilities: frozenset[str] = frozenset()
    zeroed_in_new_student: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    quantization_keep: tuple[str, ...] = ()
    sensitivity_groups: tuple[str, ...] = ()
    converters: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"backbone {self.name}: capabilities {unknown} are unknown; expected some of {CAPABILITIES}")


# The backbones the package ships, by kind: each module defines BACKBONE (a BackboneKind).
BUILT_IN = {"sana": "s2flash_jax.models.sana"}
# A model.json or run config written before kinds were recorded holds a SANA model.
DEFAULT_KIND = "sana"
_added: dict[str, BackboneKind] = {}


def register_backbone(kind: BackboneKind) -> BackboneKind:
    """Make `kind` known (a backbone outside the package, e.g. a test's)."""
    if kind.name in BUILT_IN or _added.get(kind.name, kind) is not kind:
        raise ValueError(f"a backbone of kind {kind.name!r} is already registered")
    _added[kind.name] = kind
    return kind


def backbone_kinds() -> Mapping[str, BackboneKind]:
    """{kind: BackboneKind} of every known backbone."""
    return {**{name: importlib.import_module(path).BACKBONE for name, path in BUILT_IN.items()}, **_added}


def backbone_kind(name: str) -> BackboneKind:
    kinds = backbone_kinds()
    if name not in kinds:
        raise ValueError(f"model kind {name!r} is unknown; expected one of {sorted(kinds)}")
    return kinds[name]


def kind_of(config: Any) -> BackboneKind:
    """The kind whose config class `config` is an instance of."""
    for kind in backbone_kinds().values():
        if type(config) is kind.config_class:
            return kind
    raise TypeError(f"{type(config).__name__} is the config of no registered backbone "
                    f"(known: {', '.join(k.config_class.__name__ for k in backbone_kinds().values())})")


def build_backbone(config: Any, *, precision: Precision = Precision(), rngs: nnx.Rngs) -> Backbone:
    """The backbone `config` describes, initialised from `rngs`. Its parameters carry logical axis
    names only (parallel/ maps them to a mesh when it shards), wherever it is built."""
    with nnx.use_eager_sharding(False):
        return kind_of(config).module(config, precision=precision, rngs=rngs)


def abstract_backbone(config: Any, precision: Precision = Precision()) -> Backbone:
    """The backbone `config` describes with shapes only (jax.ShapeDtypeStruct leaves): nothing allocated."""
    return nnx.eval_shape(lambda: build_backbone(config, precision=precision, rngs=nnx.Rngs(0)))


def architecture_to_json(config: Any) -> dict[str, Any]:
    """{"kind": ..., **fields}: how model.json's "model" and a run's config.json "model" / "teacher"
    store an architecture."""
    return {"kind": kind_of(config).name, **dataclasses.asdict(config)}


def architecture_class(data: Any, where: str = "a model architecture") -> tuple[type, dict[str, Any]]:
    """(config class, its field values) of an architecture as architecture_to_json wrote it; without
    "kind" (written before kinds were recorded) it is DEFAULT_KIND's. `where` names it in errors."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} should be a JSON object, got {data!r}")
    fields = dict(data)
    return backbone_kind(fields.pop("kind", DEFAULT_KIND)).config_class, fields


def architecture_from_json(data: Mapping[str, Any]) -> Any:
    """The architecture config architecture_to_json wrote (see architecture_class). ValueError /
    TypeError name what does not fit."""
    config_class, fields = architecture_class(data)
    return config_class(**fields)


def missing_capabilities(config: Any, needed: Sequence[str]) -> list[str]:
    """The capabilities in `needed` that the kind of `config` cannot have."""
    return [c for c in needed if c not in kind_of(config).capabilities]
