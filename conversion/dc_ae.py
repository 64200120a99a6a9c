"""diffusers `AutoencoderDC` (DC-AE) folders and state dicts <-> `DCAutoencoder` parameters.

`key_table(config)` is the whole mapping: one row per diffusers tensor, naming the JAX parameter
and the layout change. The JAX modules carry diffusers' names, so a row's JAX path is its torch key
with '/' for '.' (and 'kernel' for a conv's or linear's 'weight'); what a row adds is the layout.
Loading reads safetensors directly, one tensor at a time; torch is not needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from conversion.errors import ConversionError
from conversion.layouts import CONV1X1, COPY, DEPTHWISE, LINEAR, Layout
from conversion.sana_diffusers import Row
from conversion.sources import DiffusersFolder, TensorSource, check_tensors, fill_params, open_diffusers
from s2flash_jax.models.dc_ae import DCAEConfig, DCAutoencoder
from s2flash_jax.models.params import flat_params, param_paths
from s2flash_jax.precision import Precision

DIFFUSERS_CLASS = "AutoencoderDC"
# Every nn.Conv2d weight [out, in / groups, kh, kw] <-> HWIO kernel [kh, kw, in / groups, out]: the
# depthwise layout's transform, which holds for any group count.
CONV2D = dataclasses.replace(DEPTHWISE, name="conv2d")


def _row(torch_prefix: str, leaf: str, layout: Layout = COPY) -> Row:
    jax_leaf = "kernel" if layout is not COPY else leaf
    return Row(f"{torch_prefix}.{leaf}", f"{torch_prefix.replace('.', '/')}/{jax_leaf}", layout)


def _conv(prefix: str, bias: bool = True) -> list[Row]:
    return [_row(prefix, "weight", CONV2D)] + ([_row(prefix, "bias")] if bias else [])


def _norm(prefix: str) -> list[Row]:
    return [_row(prefix, "weight"), _row(prefix, "bias")]


def _res_block(prefix: str) -> list[Row]:
    return [*_conv(f"{prefix}.conv1"), *_conv(f"{prefix}.conv2", bias=False), *_norm(f"{prefix}.norm")]


def _efficient_vit_block(prefix: str, scales: int) -> list[Row]:
    attn, ffn = f"{prefix}.attn", f"{prefix}.conv_out"
    rows = [_row(f"{attn}.to_{x}", "weight", LINEAR) for x in "qkv"]
    for s in range(scales):
        rows += [*_conv(f"{attn}.to_qkv_multiscale.{s}.proj_in", bias=False),
                 *_conv(f"{attn}.to_qkv_multiscale.{s}.proj_out", bias=False)]
    return rows + [
        _row(f"{attn}.to_out", "weight", LINEAR), *_norm(f"{attn}.norm_out"),
        _row(f"{ffn}.conv_inverted", "weight", CONV1X1), _row(f"{ffn}.conv_inverted", "bias"),
        _row(f"{ffn}.conv_depth", "weight", DEPTHWISE), _row(f"{ffn}.conv_depth", "bias"),
        _row(f"{ffn}.conv_point", "weight", CONV1X1), *_norm(f"{ffn}.norm"),
    ]


def _stage(prefix: str, kind: str, count: int, first: int, scales: int) -> list[Row]:
    """`count` blocks of one kind at indices first.. of a stage's nn.Sequential."""
    rows = []
    for j in range(first, first + count):
        rows += _res_block(f"{prefix}.{j}") if kind == "ResBlock" else _efficient_vit_block(f"{prefix}.{j}", scales)
    return rows


def key_table(config: DCAEConfig) -> list[Row]:
    """Every diffusers tensor of an AutoencoderDC with this config and where it lives in JAX."""
    last = len(config.encoder_block_out_channels) - 1
    layers = config.encoder_layers_per_block
    # With no first-stage layers, conv_in is a (shortcut-free) down block, conv_out an up block.
    rows = _conv("encoder.conv_in" if layers[0] else "encoder.conv_in.conv")
    for i, count in enumerate(layers):
        rows += _stage(f"encoder.down_blocks.{i}", config.encoder_block_types[i], count, 0,
                       len(config.encoder_qkv_multiscales[i]))
        if i < last and count:
            rows += _conv(f"encoder.down_blocks.{i}.{count}.conv")
    rows += _conv("encoder.conv_out")

    last = len(config.decoder_block_out_channels) - 1
    layers = config.decoder_layers_per_block
    rows += _conv("decoder.conv_in")
    for i, count in enumerate(layers):
        upsamples = i < last and count > 0
        if upsamples:
            rows += _conv(f"decoder.up_blocks.{i}.0.conv")
        rows += _stage(f"decoder.up_blocks.{i}", config.decoder_block_types[i], count, int(upsamples),
                       len(config.decoder_qkv_multiscales[i]))
    return rows + _norm("decoder.norm_out") + _conv("decoder.conv_out" if layers[0] else "decoder.conv_out.conv")


@functools.lru_cache(maxsize=8)
def param_shapes(config: DCAEConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined JAX parameter path -> shape (nothing allocated; cached, since tracing takes a while)."""
    model = nnx.eval_shape(lambda: DCAutoencoder(config, rngs=nnx.Rngs(0)))
    return {path: shape for path, (shape, _) in param_paths(model).items()}


def expected_torch_shapes(config: DCAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape, for every tensor of an AutoencoderDC state dict with this config."""
    shapes = param_shapes(config)
    rows = key_table(config)
    covered = {row.jax_path for row in rows}
    if covered != set(shapes):
        raise RuntimeError(f"the DC-AE key table and the model disagree: table only {sorted(covered - set(shapes))}, "
                           f"model only {sorted(set(shapes) - covered)}")
    return {row.torch_key: tuple(row.layout.torch_shape(shapes[row.jax_path])) for row in rows}


def dc_ae_config_from_diffusers(config: Mapping[str, Any]) -> DCAEConfig:
    """A DCAEConfig from an AutoencoderDC `config.json` dict ('_'-keys are diffusers bookkeeping).
    ValueError names unknown keys and unsupported values."""
    fields = [f.name for f in dataclasses.fields(DCAEConfig)]
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = [f"{k!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(k, fields, n=1))
               for k in values if k not in fields]
    if unknown:
        raise ValueError(f"config has keys AutoencoderDC does not define: {', '.join(unknown)}")
    return DCAEConfig(**values)


def open_dc_ae_folder(path: str | Path) -> DiffusersFolder:
    """A diffusers AutoencoderDC folder, or the vae/ of a diffusers pipeline folder (headers only)."""
    return open_diffusers(path, DIFFUSERS_CLASS, "vae")


def dc_ae_from_source(config: DCAEConfig, source: TensorSource, precision: Precision = Precision(),
                      what: str = "state dict") -> DCAutoencoder:
    """A DCAutoencoder whose parameters are read from `source` (diffusers names and layouts), one tensor
    at a time and cast to precision.param. Every source tensor must fill exactly one parameter: one
    ConversionError names the missing, unexpected and mis-shaped keys, or non-float tensors."""
    check_tensors(source, expected_torch_shapes(config), what, "{what} does not fit an AutoencoderDC of its config: "
                  "{problems}")
    model = nnx.eval_shape(lambda: DCAutoencoder(config, precision=precision, rngs=nnx.Rngs(0)))
    return fill_params(model, key_table(config), source, precision.param)


def load_dc_ae(path: str | Path, precision: Precision | None = None) -> DCAutoencoder:
    """The DC-AE of a diffusers AutoencoderDC folder (config.json + diffusion_pytorch_model*.safetensors,
    single or sharded) or of a pipeline folder's vae/. precision None: `Precision()`, the models'
    default (float32 weights, bfloat16 compute)."""
    folder = open_dc_ae_folder(path)
    try:
        config = dc_ae_config_from_diffusers(folder.config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder.path}/config.json: {e}") from e
    return dc_ae_from_source(config, folder.tensors, precision or Precision(), str(folder.path))


def dc_ae_state_dict(model: DCAutoencoder) -> dict[str, np.ndarray]:
    """The model's parameters as a diffusers AutoencoderDC state dict of numpy arrays (parameter dtype)."""
    params = flat_params(model)
    return {row.torch_key: np.ascontiguousarray(row.layout.to_torch(np.asarray(params[row.jax_path])))
            for row in key_table(model.config)}

