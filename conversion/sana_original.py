"""Original NVlabs SANA / SANA-Sprint checkpoints (`.pth` as SANA's trainer saves them, or
`.safetensors` with the same key names), on top of the diffusers key table.

Every diffusers tensor has one original name: `ORIGINAL_MODULES` renames its module, except the
fused projections (`FUSED`), where diffusers' to_q/to_k/to_v are equal row blocks of the original
`attn.qkv` and to_k/to_v of `cross_attn.kv_linear` (torch.chunk along dim 0, as diffusers'
scripts/convert_sana_to_diffusers.py splits them). Tensors diffusers drops are handled here too:
the logvar head is a JAX parameter (`jax_only_rows`), the learned null caption
`y_embedder.y_embedding` [300, caption_channels] is kept beside the weights, and `pos_embed` (a
fixed sin-cos buffer, zeros when unused) is only checked against the config.

An original checkpoint does not record its architecture. `infer_config` reads what shapes and key
names tell (width, depth, channels, patch size, MLP ratio, which optional parts exist) and takes the
rest (head split, sample size, time-embedding scale) from a preset or a diffusers-style config.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from conversion.errors import ConversionError
from conversion.safetensors_io import TensorSpec
from conversion.sana_diffusers import Row, jax_only_rows, key_table, tensor_keys
from conversion.sources import TensorSource, read_json_object
from s2flash_jax.models.sana import SanaConfig

# diffusers module -> original module ("{i}": block index; "" is the model itself).
ORIGINAL_MODULES = {
    "patch_embed.proj": "x_embedder.proj",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "caption_norm": "attention_y_norm",
    "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",  # without guidance embedding
    "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.guidance_embedder.linear_1": "cfg_embedder.mlp.0",
    "time_embed.guidance_embedder.linear_2": "cfg_embedder.mlp.2",
    "time_embed.linear": "t_block.1",
    "": "final_layer",  # the final scale_shift_table
    "proj_out": "final_layer.linear",
    "logvar_linear": "logvar_linear",
    "transformer_blocks.{i}": "blocks.{i}",  # the block's scale_shift_table
    "transformer_blocks.{i}.attn1.norm_q": "blocks.{i}.attn.q_norm",
    "transformer_blocks.{i}.attn1.norm_k": "blocks.{i}.attn.k_norm",
    "transformer_blocks.{i}.attn1.to_out.0": "blocks.{i}.attn.proj",
    "transformer_blocks.{i}.attn2.to_q": "blocks.{i}.cross_attn.q_linear",
    "transformer_blocks.{i}.attn2.norm_q": "blocks.{i}.cross_attn.q_norm",
    "transformer_blocks.{i}.attn2.norm_k": "blocks.{i}.cross_attn.k_norm",
    "transformer_blocks.{i}.attn2.to_out.0": "blocks.{i}.cross_attn.proj",
    "transformer_blocks.{i}.norm2": "blocks.{i}.norm2",
    "transformer_blocks.{i}.ff.conv_inverted": "blocks.{i}.mlp.inverted_conv.conv",
    "transformer_blocks.{i}.ff.conv_depth": "blocks.{i}.mlp.depth_conv.conv",
    "transformer_blocks.{i}.ff.conv_point": "blocks.{i}.mlp.point_conv.conv",
}
# diffusers module -> (original fused module, its row block, of how many equal blocks)
FUSED = {
    "transformer_blocks.{i}.attn1.to_q": ("blocks.{i}.attn.qkv", 0, 3),
    "transformer_blocks.{i}.attn1.to_k": ("blocks.{i}.attn.qkv", 1, 3),
    "transformer_blocks.{i}.attn1.to_v": ("blocks.{i}.attn.qkv", 2, 3),
    "transformer_blocks.{i}.attn2.to_k": ("blocks.{i}.cross_attn.kv_linear", 0, 2),
    "transformer_blocks.{i}.attn2.to_v": ("blocks.{i}.cross_attn.kv_linear", 1, 2),
}
NULL_CAPTION = "y_embedder.y_embedding"
POS_EMBED = "pos_embed"

# Architectures as diffusers' convert script writes them (shared/reference/sana_sprint.md, section 2.1).
_1024PX = dict(in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5,
               attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
               interpolation_scale=None)
_0_6B = dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16, cross_attention_head_dim=72,
             cross_attention_dim=1152)
_1_6B = dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
             cross_attention_dim=2240)
_SPRINT_STUDENT = dict(guidance_embeds=True, guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads", timestep_scale=1.0)
# The Sprint teacher embeds flow time s in [0, 1] (dense time embedding): SanaPipeline's 1000·s × 0.001.
_SPRINT_TEACHER = dict(guidance_embeds=False, qk_norm="rms_norm_across_heads", timestep_scale=0.001)
_SANA = dict(guidance_embeds=False, qk_norm=None, timestep_scale=1.0)
PRESETS = {
    "sana-sprint-0.6b": {**_1024PX, **_0_6B, **_SPRINT_STUDENT},
    "sana-sprint-1.6b": {**_1024PX, **_1_6B, **_SPRINT_STUDENT},
    "sana-sprint-0.6b-teacher": {**_1024PX, **_0_6B, **_SPRINT_TEACHER},
    "sana-sprint-1.6b-teacher": {**_1024PX, **_1_6B, **_SPRINT_TEACHER},
    "sana-0.6b-1024px": {**_1024PX, **_0_6B, **_SANA},
    "sana-1.6b-1024px": {**_1024PX, **_1_6B, **_SANA},
}


@dataclasses.dataclass(frozen=True)
class OriginalTensor:
    """Where a diffusers/JAX-only row's tensor lives in an original checkpoint: row block `part`
    of `parts` equal blocks (along dim 0) of tensor `key`."""

    key: str  # with "{i}" for per-block tensors
    part: int = 0
    parts: int = 1


def original_tensor(row: Row) -> OriginalTensor:
    module, _, leaf = row.torch_key.rpartition(".")
    if module in FUSED:
        fused, part, parts = FUSED[module]
        return OriginalTensor(f"{fused}.{leaf}", part, parts)
    if module not in ORIGINAL_MODULES:
        raise KeyError(f"no original SANA name for diffusers module {module!r} (key {row.torch_key})")
    prefix = ORIGINAL_MODULES[module]
    return OriginalTensor(f"{prefix}.{leaf}" if prefix else leaf)


def original_rows(config: SanaConfig) -> list[tuple[Row, OriginalTensor]]:
    """Every JAX parameter's rows (diffusers' and the JAX-only ones) with their original tensors."""
    return [(row, original_tensor(row)) for row in key_table(config) + jax_only_rows(config)]


def original_state_dict(diffusers: dict[str, np.ndarray], config: SanaConfig) -> dict[str, np.ndarray]:
    """A diffusers state dict (plus any JAX-only tensors under their torch names) in the original
    layout: renamed, q|k|v and k|v concatenated along dim 0 (the inverse of the import's split)."""
    pieces: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
    for row, original in original_rows(config):
        for key, block in tensor_keys(row, config.num_layers):
            pieces[original.key.format(i=block)][original.part] = diffusers[key]
    return {key: np.concatenate([parts[p] for p in sorted(parts)]) for key, parts in pieces.items()}


# ---- the architecture of an original checkpoint ----

def load_config_arg(value: str) -> dict[str, Any]:
    """--config: a preset name or a diffusers-style config.json path -> a diffusers config dict."""
    if value in PRESETS:
        return dict(PRESETS[value])
    path = Path(value)
    if not path.is_file():
        raise ConversionError(f"--config {value!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    return read_json_object(path, f"--config {value}", "a JSON object of SanaTransformer2DModel config keys")


_BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Observed:
    """What an original state dict's key names and shapes tell about its architecture.

    keys: diffusers config keys they determine; width: heads x head_dim; ffn_hidden: the
    feed-forward width int(mlp_ratio x width)."""

    keys: dict[str, Any]
    width: int
    ffn_hidden: int
    logvar_head: bool


def observe_architecture(specs: dict[str, TensorSpec]) -> Observed:
    """specs: original key -> TensorSpec. Raises ConversionError if it is not a SANA state dict."""
    needed = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight",
              "blocks.0.mlp.point_conv.conv.weight")
    absent = [key for key in needed if key not in specs]
    if absent:
        raise ConversionError(f"not an original SANA checkpoint: it lacks {', '.join(absent)} "
                              f"(its keys begin {', '.join(sorted(specs)[:3]) or '(none)'}, ...)")
    width, in_channels, patch, patch_w = specs["x_embedder.proj.weight"].shape
    if patch != patch_w:
        raise ConversionError(f"x_embedder.proj.weight {specs['x_embedder.proj.weight'].shape}: non-square patches "
                              f"are not supported")
    self_norm, cross_norm = "blocks.0.attn.q_norm.weight" in specs, "blocks.0.cross_attn.q_norm.weight" in specs
    if self_norm != cross_norm:
        raise ConversionError(f"q/k norms in {'self' if self_norm else 'cross'}-attention only; SanaTransformer2DModel "
                              f"has them in both attentions or neither (qk_norm)")
    keys = dict(
        in_channels=in_channels,
        out_channels=specs["final_layer.linear.weight"].shape[0] // (patch * patch),
        num_layers=1 + max(int(m.group(1)) for key in specs if (m := _BLOCK.match(key))),
        cross_attention_dim=width,
        caption_channels=specs["y_embedder.y_proj.fc1.weight"].shape[1],
        attention_bias="blocks.0.attn.qkv.bias" in specs,
        patch_size=patch,
        norm_elementwise_affine="blocks.0.norm2.weight" in specs,
        guidance_embeds="cfg_embedder.mlp.0.weight" in specs,
        qk_norm="rms_norm_across_heads" if self_norm else None,
    )
    return Observed(keys, width, specs["blocks.0.mlp.point_conv.conv.weight"].shape[1],
                    "logvar_linear.weight" in specs)


def infer_config(specs: dict[str, TensorSpec], given: dict[str, Any] | None) -> tuple[SanaConfig, str]:
    """The SanaConfig of an original checkpoint and where its unobservable keys came from.

    given: a diffusers config dict (--config), or None to pick the one preset that fits (only for
    Sprint students: a teacher's time-embedding scale is not in the file)."""
    observed = observe_architecture(specs)
    if given is None:
        given, origin = _matching_preset(observed)
    else:
        origin = "--config"
    given = {k: v for k, v in given.items() if not k.startswith("_")}
    mismatched = [f"{key}={value!r} in the checkpoint, {given[key]!r} in {origin}"
                  for key, value in observed.keys.items() if key in given and given[key] != value]
    if mismatched:
        raise ConversionError(f"the checkpoint does not fit {origin}: {'; '.join(mismatched)}")
    values = {"mlp_ratio": observed.ffn_hidden / observed.width, **given, **observed.keys}
    try:
        config = SanaConfig.from_diffusers(values, logvar_head=observed.logvar_head)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{origin}: {e}") from e
    if config.inner_dim != observed.width:
        raise ConversionError(f"the checkpoint is {observed.width} wide but {origin} has num_attention_heads x "
                              f"attention_head_dim = {config.num_attention_heads} x {config.attention_head_dim} = "
                              f"{config.inner_dim}")
    if config.ffn_hidden_dim != observed.ffn_hidden:
        raise ConversionError(f"mlp_ratio={config.mlp_ratio} in {origin} gives a feed-forward width of "
                              f"{config.ffn_hidden_dim}; the checkpoint's is {observed.ffn_hidden}")
    return config, origin


def _matching_preset(observed: Observed) -> tuple[dict[str, Any], str]:
    fits = [name for name, preset in PRESETS.items()
            if preset["num_attention_heads"] * preset["attention_head_dim"] == observed.width
            and int(preset["mlp_ratio"] * observed.width) == observed.ffn_hidden
            and all(preset[k] == v for k, v in observed.keys.items())]
    if not observed.keys["guidance_embeds"]:
        teachers = [name for name in fits if not PRESETS[name]["guidance_embeds"]]
        raise ConversionError(
            "an original checkpoint without a guidance embedder (a flow teacher) does not record its time-embedding "
            "scale (SANA-Sprint teachers 0.001, base SANA 1.0): pass --config "
            + "".join(f"{name} or " for name in teachers) + "a diffusers config.json")
    if len(fits) != 1:
        known = ", ".join(f"{name} ({p['num_attention_heads'] * p['attention_head_dim']} wide, {p['num_layers']} blocks)"
                          for name, p in PRESETS.items() if p["guidance_embeds"])
        raise ConversionError(f"cannot tell the head split, sample size and time scale of a {observed.width}-wide, "
                              f"{observed.keys['num_layers']}-block checkpoint: no preset fits (students: {known}); "
                              f"pass --config with a diffusers config.json")
    return dict(PRESETS[fits[0]]), f"preset {fits[0]}"


def check_pos_embed(source: TensorSource, config: SanaConfig) -> None:
    """pos_embed is a fixed buffer (zeros unless the model used a sin-cos embedding): it must agree
    with the config's interpolation_scale, since the model recomputes it from that."""
    if POS_EMBED not in source.keys():
        return
    used = bool(np.any(source.read(POS_EMBED)))
    if used != (config.interpolation_scale is not None):
        raise ConversionError(
            f"the checkpoint's pos_embed is {'non-zero' if used else 'all zeros'} but the config has "
            f"interpolation_scale={config.interpolation_scale}: pass --config with "
            + ("the interpolation_scale the model was trained with" if used else "interpolation_scale null"))
