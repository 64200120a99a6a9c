"""diffusers `SanaTransformer2DModel` state dict <-> `SanaTransformer` parameters.

`key_table(config)` is the whole mapping: one row per diffusers tensor, naming the JAX parameter and
the layout change. Per-block rows use `{i}` in the diffusers key and map onto the stacked `layers` axis.
`jax_only_rows(config)` adds the parameters diffusers has no place for (SANA-Sprint's logvar head),
under the torch names NVlabs SANA and diffusers' training port give them. LoRA adapters are no part
of a diffusers model: conversion/lora.py writes them as diffusers' separate LoRA file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from conversion.layouts import CONV1X1, COPY, DEPTHWISE, LINEAR, Layout, patch_conv
from s2flash_jax.models.lora import ADAPTER_NAMES
from s2flash_jax.models.params import flat_params, param_paths, set_flat_params
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from s2flash_jax.precision import Precision

# Parameters diffusers does not have: kept at their initial values on a diffusers import, dropped on export.
JAX_ONLY = ("logvar_linear/",)


@dataclasses.dataclass(frozen=True)
class Row:
    torch_key: str  # with "{i}" for per-block tensors
    jax_path: str
    layout: Layout = COPY

    @property
    def per_block(self) -> bool:
        return "{i}" in self.torch_key


def _linear(torch_prefix: str, jax_prefix: str, bias: bool = True) -> list[Row]:
    rows = [Row(f"{torch_prefix}.weight", f"{jax_prefix}/kernel", LINEAR)]
    if bias:
        rows.append(Row(f"{torch_prefix}.bias", f"{jax_prefix}/bias"))
    return rows


def key_table(config: SanaConfig) -> list[Row]:
    """Every diffusers tensor of a model with this config and where it lives in JAX."""
    # Without guidance diffusers nests the time MLP inside AdaLayerNormSingle's `emb`.
    time_prefix = "time_embed." if config.guidance_embeds else "time_embed.emb."
    rows = [
        Row("patch_embed.proj.weight", "patch_embed/proj/kernel", patch_conv(config.patch_size)),
        Row("patch_embed.proj.bias", "patch_embed/proj/bias"),
        *_linear("time_embed.linear", "time_embed/linear"),
        *_linear("caption_projection.linear_1", "caption_projection/linear_1"),
        *_linear("caption_projection.linear_2", "caption_projection/linear_2"),
        Row("caption_norm.weight", "caption_norm/weight"),
        Row("scale_shift_table", "scale_shift_table"),
        *_linear("proj_out", "proj_out"),
    ]
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if config.guidance_embeds else [])
    for embedder in embedders:
        prefix = time_prefix if embedder == "timestep_embedder" else "time_embed."
        for linear in ("linear_1", "linear_2"):
            rows += _linear(f"{prefix}{embedder}.{linear}", f"time_embed/{embedder}/{linear}")

    block = "transformer_blocks.{i}"
    jblock = "transformer_blocks"
    rows.append(Row(f"{block}.scale_shift_table", f"{jblock}/scale_shift_table"))
    for attn, qkv_bias in (("attn1", config.attention_bias), ("attn2", True)):
        for proj in ("to_q", "to_k", "to_v"):
            rows += _linear(f"{block}.{attn}.{proj}", f"{jblock}/{attn}/{proj}", bias=qkv_bias)
        rows += _linear(f"{block}.{attn}.to_out.0", f"{jblock}/{attn}/to_out")
        if config.qk_norm is not None:
            rows += [Row(f"{block}.{attn}.norm_{x}.weight", f"{jblock}/{attn}/norm_{x}/weight") for x in "qk"]
    if config.norm_elementwise_affine:
        rows += [Row(f"{block}.norm2.{x}", f"{jblock}/norm2/{x}") for x in ("weight", "bias")]
    rows += [
        Row(f"{block}.ff.conv_inverted.weight", f"{jblock}/ff/conv_inverted/kernel", CONV1X1),
        Row(f"{block}.ff.conv_inverted.bias", f"{jblock}/ff/conv_inverted/bias"),
        Row(f"{block}.ff.conv_depth.weight", f"{jblock}/ff/conv_depth/kernel", DEPTHWISE),
        Row(f"{block}.ff.conv_depth.bias", f"{jblock}/ff/conv_depth/bias"),
        Row(f"{block}.ff.conv_point.weight", f"{jblock}/ff/conv_point/kernel", CONV1X1),
    ]
    return rows


def jax_only_rows(config: SanaConfig) -> list[Row]:
    """The JAX parameters diffusers' SanaTransformer2DModel lacks, with their torch (nn.Linear) names."""
    return _linear("logvar_linear", "logvar_linear") if config.logvar_head else []


def tensor_keys(row: Row, num_layers: int) -> list[tuple[str, int | None]]:
    """The concrete torch keys of a row: (key, block index) per block, or (key, None) once."""
    if row.per_block:
        return [(row.torch_key.format(i=i), i) for i in range(num_layers)]
    return [(row.torch_key, None)]


@functools.lru_cache(maxsize=16)
def param_shapes(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined JAX parameter path -> shape for a model of this config (nothing allocated; cached,
    since tracing the model takes a while)."""
    model = nnx.eval_shape(lambda: SanaTransformer(config, rngs=nnx.Rngs(0)))
    return {path: shape for path, (shape, _) in param_paths(model).items()}


class StateDictMismatch(ValueError):
    """A state dict that does not fit the model: lists every missing, unexpected and mis-shaped key."""


def expected_torch_shapes(model: SanaTransformer) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape that a state dict for this model (a real or an nnx.eval_shape one) must have."""
    shapes = {path: shape for path, (shape, _) in param_paths(model).items()}
    expected = {}
    for row in key_table(model.config):
        for key, block in tensor_keys(row, model.config.num_layers):
            shape = shapes[row.jax_path] if block is None else shapes[row.jax_path][1:]
            expected[key] = tuple(row.layout.torch_shape(shape))
    return expected


@dataclasses.dataclass(frozen=True)
class ShapeProblems:
    """How a set of tensor shapes differs from the expected one; empty when it fits."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[str]

    @classmethod
    def compare(cls, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> ShapeProblems:
        return cls(missing=[f"{k}: expected {expected[k]}" for k in expected if k not in found],
                   unexpected=[f"{k}: found {tuple(found[k])}" for k in found if k not in expected],
                   wrong=[f"{k}: expected {expected[k]}, found {tuple(found[k])}"
                          for k in expected if k in found and tuple(found[k]) != expected[k]])

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)

    def _groups(self):
        return [(title, lines) for title, lines in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                                                    ("wrong shapes", self.wrong)) if lines]

    def details(self) -> str:
        """Every problem, one per line."""
        return "\n".join(f"{title} ({len(lines)}):\n" + "\n".join(f"  {line}" for line in lines)
                         for title, lines in self._groups())

    def summary(self, shown: int = 2) -> str:
        """One line: the count of each kind of problem and its first few."""
        return "; ".join(f"{len(lines)} {title} ({', '.join(lines[:shown])}{', ...' if len(lines) > shown else ''})"
                         for title, lines in self._groups())


def _check_state_dict(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    problems = ShapeProblems.compare(expected, found)
    if problems:
        raise StateDictMismatch("state dict does not match SanaTransformer2DModel for this config:\n"
                                + problems.details())


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch.Tensor; numpy has no bfloat16, so widen it
        import torch

        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    return np.asarray(tensor)


def load_diffusers_state_dict(model: SanaTransformer, state_dict: Mapping[str, Any]) -> list[str]:
    """Write a diffusers state dict into `model` in place (cast to the model's parameter dtype).

    Raises StateDictMismatch naming every missing / unexpected / mis-shaped key before touching the model.
    Returns the JAX-only parameters (e.g. the logvar head, LoRA adapters) that kept their initial values.
    """
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    _check_state_dict(expected_torch_shapes(model), found)
    values = {}
    for row in key_table(model.config):
        tensors = [row.layout.to_jax(_to_numpy(state_dict[key])) for key, _ in tensor_keys(row, model.config.num_layers)]
        values[row.jax_path] = np.stack(tensors) if row.per_block else tensors[0]
    set_flat_params(model, values)
    untouched = sorted(p for p in param_paths(model) if p not in values)
    unmapped = [p for p in untouched if not p.startswith(JAX_ONLY) and p.rpartition("/")[2] not in ADAPTER_NAMES]
    if unmapped:
        raise RuntimeError(f"key_table has no row for JAX parameters {unmapped}")
    return untouched


def diffusers_state_dict(model: SanaTransformer) -> dict[str, np.ndarray]:
    """The model's parameters as a diffusers state dict of float32 numpy arrays (JAX-only ones dropped).
    A model with LoRA adapters is refused: merge them first (s2flash_jax.models.lora.merge_lora)."""
    if model.config.lora is not None:
        raise ValueError(f"the model has LoRA adapters (lora_rank={model.config.lora_rank}), which a diffusers state "
                         "dict has no place for; fold them in with s2flash_jax.models.lora.merge_lora first")
    params = {path: np.array(value, dtype=np.float32) for path, value in flat_params(model).items()}
    out = {}
    for row in key_table(model.config):
        value = params[row.jax_path]
        for key, block in tensor_keys(row, model.config.num_layers):
            out[key] = np.ascontiguousarray(row.layout.to_torch(value if block is None else value[block]))
    return out


def sana_from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                        precision: Precision = Precision(), logvar_head: bool = False,
                        seed: int = 0) -> SanaTransformer:
    """A SanaTransformer from a diffusers config dict and state dict (e.g. `model.config`, `model.state_dict()`)."""
    sana_config = SanaConfig.from_diffusers(dict(config), logvar_head=logvar_head)
    model = SanaTransformer(sana_config, precision=precision, rngs=nnx.Rngs(seed))
    load_diffusers_state_dict(model, state_dict)
    return model
