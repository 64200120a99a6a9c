"""A transformers Gemma-2 checkpoint folder -> `s2flash_jax.models.gemma2.Gemma2Model`, without torch.

Reads what `Gemma2Model` / `Gemma2ForCausalLM.save_pretrained` write: config.json and
`model.safetensors`, or `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.
Keys are `layers.{i}.…` (Gemma2Model, as SANA pipelines save their text encoder) or
`model.layers.{i}.…` (Gemma2ForCausalLM, e.g. google/gemma-2-2b-it); `lm_head.weight` (tied to the
token embedding) is ignored. A diffusers pipeline folder works too: its `text_encoder/` and
`tokenizer/`. Every tensor must be consumed and every parameter filled: missing, unexpected and
mis-shaped keys are one ConversionError naming them. `load_caption_encoder` adds the tokenizer,
read from its tokenizer.json with the `tokenizers` library (`FastTokenizer`): importing
transformers would import torch.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.errors import ConversionError
from conversion.importer import aligned_empty, nest
from conversion.layouts import COPY, LINEAR
from conversion.safetensors_io import SafetensorsFile, SafetensorsFiles, weight_files
from conversion.sana_diffusers import Row, tensor_keys
from conversion.sources import check_tensors, read_json_object
from s2flash_jax.data.captions import SANA_CHI_PROMPT, FastTokenizer
from s2flash_jax.models.gemma2 import CaptionEncoder, Gemma2Config, Gemma2Model
from s2flash_jax.models.params import param_paths
from s2flash_jax.precision import FP32, Precision

WEIGHTS = "model"  # transformers' safetensors file prefix
CAUSAL_LM_PREFIX = "model."  # Gemma2ForCausalLM nests the Gemma2Model under `model`
IGNORED = ("lm_head.weight",)  # the LM head, tied to embed_tokens; a text encoder has no use for it
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
SHOWN_PROBLEMS = 5


def key_table(config: Gemma2Config) -> list[Row]:
    """Every Gemma2Model tensor (without the `model.` prefix) and the JAX parameter it fills."""
    rows = [Row("embed_tokens.weight", "embed_tokens/embedding"), Row("norm.weight", "norm/weight")]
    projections = [("self_attn", p, config.attention_bias) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [("mlp", p, False) for p in ("gate_proj", "up_proj", "down_proj")]
    for module, proj, bias in projections:
        rows.append(Row(f"layers.{{i}}.{module}.{proj}.weight", f"layers/{module}/{proj}/kernel", LINEAR))
        if bias:
            rows.append(Row(f"layers.{{i}}.{module}.{proj}.bias", f"layers/{module}/{proj}/bias", COPY))
    rows += [Row(f"layers.{{i}}.{norm}.weight", f"layers/{norm}/weight") for norm in NORMS]
    return rows


def text_encoder_folder(path: str | Path) -> Path:
    """`path`, or its `text_encoder/` when `path` is a pipeline folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder"
    return path


def tokenizer_folder(path: str | Path) -> Path:
    """`path`, or its `tokenizer/` when `path` is a pipeline folder."""
    path = Path(path)
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def read_gemma2_config(folder: str | Path) -> Gemma2Config:
    """The Gemma2Config of a transformers folder's config.json (ConversionError if it is not one)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json; expected a transformers Gemma-2 folder (config.json + "
                              "model*.safetensors) or a pipeline folder with text_encoder/")
    config = read_json_object(config_path, str(config_path), "a JSON object (a transformers config)")
    try:
        return Gemma2Config.from_transformers(config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{config_path}: {e}") from e


def load_gemma2(path: str | Path, *, precision: Precision = FP32) -> Gemma2Model:
    """The Gemma-2 of a transformers checkpoint folder (or a pipeline's text_encoder/), parameters
    cast to precision.param. Reads one tensor at a time into the stacked parameter buffers."""
    folder = text_encoder_folder(path)
    config = read_gemma2_config(folder)
    source = SafetensorsFiles([SafetensorsFile(f) for f in weight_files(folder, WEIGHTS)])
    abstract = nnx.eval_shape(lambda: Gemma2Model(config, precision=precision, rngs=nnx.Rngs(0)))
    shapes = {path: shape for path, (shape, _) in param_paths(abstract).items()}
    rows = key_table(config)
    uncovered = sorted(set(shapes) - {row.jax_path for row in rows})
    if uncovered:
        raise RuntimeError(f"the Gemma-2 key table misses JAX parameters {uncovered}")

    keys = [key for key in source.keys() if key not in IGNORED]
    prefix = CAUSAL_LM_PREFIX if any(key.startswith(CAUSAL_LM_PREFIX) for key in keys) else ""
    expected = {}
    for row in rows:
        for key, block in tensor_keys(row, config.num_hidden_layers):
            shape = shapes[row.jax_path] if block is None else shapes[row.jax_path][1:]
            expected[prefix + key] = tuple(row.layout.torch_shape(shape))
    check_tensors(source, expected, str(folder), "{what}: the weights do not fit the Gemma-2 of its config.json: "
                  "{problems}", keys=keys, shown=SHOWN_PROBLEMS)

    dtype = np.dtype(precision.param)
    buffers = {path: aligned_empty(shape, dtype) for path, shape in shapes.items()}
    for row in rows:
        for key, block in tensor_keys(row, config.num_hidden_layers):
            destination = buffers[row.jax_path] if block is None else buffers[row.jax_path][block]
            destination[...] = row.layout.to_jax(source.read(prefix + key))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, nest({path: jnp.asarray(buffer) for path, buffer in buffers.items()}))
    return nnx.merge(graphdef, state)


def load_caption_encoder(path: str | Path, *, caption_length: int = 300, chi_prompt: str | None = SANA_CHI_PROMPT,
                         precision: Precision = FP32, lowercase: bool = False) -> CaptionEncoder:
    """SANA's caption encoder from a folder with a Gemma-2 and its tokenizer (or a pipeline folder
    with text_encoder/ + tokenizer/). Neither torch nor transformers: the tokenizer's tokenizer.json is
    read with the `tokenizers` library (`FastTokenizer`). lowercase: see CaptionEncoder (True to
    encode prompts as diffusers' pipelines do when sampling)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{str(path)!r} does not exist; expected a transformers Gemma-2 folder (config.json, "
                              "model*.safetensors, tokenizer.json) or a pipeline folder with text_encoder/ and "
                              "tokenizer/")
    try:
        tokenizer = FastTokenizer.from_folder(tokenizer_folder(path))
    except ValueError as e:
        raise ConversionError(str(e)) from e
    return CaptionEncoder(tokenizer, load_gemma2(path, precision=precision), caption_length=caption_length,
                          chi_prompt=chi_prompt, lowercase=lowercase)
