"""A transformers CLIP folder -> `s2flash_jax.eval.clip.ClipScorer` (model, tokenizer, image settings), without torch.

Reads what `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained` write (e.g. a local copy
of openai/clip-vit-large-patch14): config.json, `model.safetensors` (or sharded with its index;
a folder with only `pytorch_model.bin` is read through torch), tokenizer.json with
tokenizer_config.json (read by the `tokenizers` library), and preprocessor_config.json (optional:
OpenAI's 224 px bicubic resize and crop, mean and std, when absent). The key table maps every
tensor; `logit_scale` (a softmax temperature, not part of the score) and the position-id buffers
older checkpoints carry are skipped. Missing, unexpected and mis-shaped keys are one ConversionError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx

from conversion.errors import ConversionError
from conversion.layouts import COPY, LINEAR, patch_conv
from conversion.safetensors_io import SafetensorsFile, SafetensorsFiles, weight_files
from conversion.sana_diffusers import Row
from conversion.sources import (TensorSource, TorchStateDict, _load_torch_file, check_tensors, fill_params,
                                read_json_object)
from s2flash_jax.data.captions import FastTokenizer
from s2flash_jax.eval.clip import ClipScorer, CLIPConfig, CLIPModel, ImagePreprocessing
from s2flash_jax.models.params import param_paths
from s2flash_jax.precision import FP32, Precision

WEIGHTS = "model"  # transformers' safetensors file prefix
TORCH_WEIGHTS = "pytorch_model.bin"
SKIPPED = ("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
BICUBIC = 3  # PIL's (and transformers' PILImageResampling) code for bicubic
EXPECTED = ("a transformers CLIP folder (config.json of a CLIPModel, model.safetensors, tokenizer.json; e.g. a local "
            "copy of openai/clip-vit-large-patch14)")


def _layer_rows(torch_prefix: str, jax_prefix: str) -> list[Row]:
    rows = []
    for torch_name, jax_name in [(f"self_attn.{p}", f"self_attn/{p}") for p in ("q_proj", "k_proj", "v_proj",
                                                                                   "out_proj")] + [
            ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]:
        rows += [Row(f"{torch_prefix}.{torch_name}.weight", f"{jax_prefix}/{jax_name}/kernel", LINEAR),
                 Row(f"{torch_prefix}.{torch_name}.bias", f"{jax_prefix}/{jax_name}/bias", COPY)]
    for norm in ("layer_norm1", "layer_norm2"):
        rows += _norm(f"{torch_prefix}.{norm}", f"{jax_prefix}/{norm}")
    return rows


def _norm(torch_prefix: str, jax_prefix: str) -> list[Row]:
    return [Row(f"{torch_prefix}.weight", f"{jax_prefix}/weight"), Row(f"{torch_prefix}.bias", f"{jax_prefix}/bias")]


def key_table(config: CLIPConfig) -> list[Row]:
    """Every CLIPModel tensor the score uses and the JAX parameter it fills."""
    rows = [Row("text_model.embeddings.token_embedding.weight", "text_model/token_embedding/embedding"),
            Row("text_model.embeddings.position_embedding.weight", "text_model/position_embedding/embedding"),
            *_norm("text_model.final_layer_norm", "text_model/final_layer_norm"),
            Row("vision_model.embeddings.class_embedding", "vision_model/class_embedding"),
            Row("vision_model.embeddings.patch_embedding.weight", "vision_model/patch_embedding/kernel",
                patch_conv(config.vision.patch_size)),
            Row("vision_model.embeddings.position_embedding.weight", "vision_model/position_embedding/embedding"),
            *_norm("vision_model.pre_layrnorm", "vision_model/pre_layrnorm"),
            *_norm("vision_model.post_layernorm", "vision_model/post_layernorm"),
            Row("text_projection.weight", "text_projection/kernel", LINEAR),
            Row("visual_projection.weight", "visual_projection/kernel", LINEAR)]
    for tower, tower_config in (("text_model", config.text), ("vision_model", config.vision)):
        for i in range(tower_config.num_hidden_layers):
            rows += _layer_rows(f"{tower}.encoder.layers.{i}", f"{tower}/encoder/layers/{i}")
    return rows


def read_clip_config(folder: Path) -> CLIPConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json; expected {EXPECTED}")
    config = read_json_object(config_path, str(config_path), "a JSON object (a transformers config)")
    try:
        return CLIPConfig.from_transformers(config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{config_path}: {e}") from e


def open_clip_weights(folder: Path) -> TensorSource:
    """model*.safetensors, or pytorch_model.bin through torch."""
    if not list(folder.glob("*.safetensors")) and (folder / TORCH_WEIGHTS).is_file():
        return TorchStateDict(_load_torch_file(folder / TORCH_WEIGHTS))
    return SafetensorsFiles([SafetensorsFile(f) for f in weight_files(folder, WEIGHTS)])


def clip_from_source(config: CLIPConfig, source: TensorSource, precision: Precision = FP32,
                     what: str = "state dict") -> CLIPModel:
    """A CLIPModel filled from `source` (transformers names and layouts), weights cast to precision.param."""
    abstract = nnx.eval_shape(lambda: CLIPModel(config, precision=precision, rngs=nnx.Rngs(0)))
    shapes = {path: shape for path, (shape, _) in param_paths(abstract).items()}
    rows = key_table(config)
    uncovered = sorted(set(shapes) ^ {row.jax_path for row in rows})
    if uncovered:
        raise RuntimeError(f"the CLIP key table and the model disagree on {uncovered}")
    expected = {row.torch_key: tuple(row.layout.torch_shape(shapes[row.jax_path])) for row in rows}
    check_tensors(source, expected, what, "{what}: the weights do not fit the CLIP of its config.json: {problems}",
                  keys=[key for key in source.keys() if key not in SKIPPED])
    return fill_params(abstract, rows, source, precision.param)


def load_clip(path: str | Path, precision: Precision = FP32) -> CLIPModel:
    """The CLIPModel of a transformers folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConversionError(f"CLIP model {str(folder)!r} does not exist; expected {EXPECTED}")
    return clip_from_source(read_clip_config(folder), open_clip_weights(folder), precision, str(folder))


def _square(value: Any, key: str, where: Path) -> int:
    """An int size from a preprocessor_config entry: 224, {"shortest_edge": 224} or {"height": h, "width": h}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ConversionError(f"{where}: {key}={value!r} is not supported (expected an int, shortest_edge or a square "
                          "height/width)")


def read_preprocessing(folder: Path, image_size: int = ImagePreprocessing.crop_size) -> ImagePreprocessing:
    """preprocessor_config.json's resize, crop, mean and std; where absent, CLIPImageProcessor's defaults
    (bicubic, OpenAI's mean and std) at the vision tower's `image_size`. A crop of another size than
    the tower takes is one ConversionError."""
    path = folder / "preprocessor_config.json"
    default = ImagePreprocessing(size=image_size, crop_size=image_size)
    if not path.is_file():
        return default
    config = read_json_object(path, str(path), "a JSON object (an image processor config)")
    unsupported = [f"{key}={config[key]!r}" for key, allowed in (("do_resize", True), ("do_center_crop", True),
                                                                 ("do_normalize", True), ("do_rescale", True),
                                                                 ("resample", BICUBIC)) if config.get(key, allowed) != allowed]
    if abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        unsupported.append(f"rescale_factor={config['rescale_factor']!r}")
    if unsupported:
        raise ConversionError(f"{path}: {', '.join(unsupported)} is not supported (CLIP score preprocesses as "
                              "CLIPImageProcessor's defaults: bicubic resize, centre crop, x/255, normalise)")
    preprocessing = ImagePreprocessing(size=_square(config.get("size", default.size), "size", path),
                                       crop_size=_square(config.get("crop_size", default.crop_size), "crop_size", path),
                                       mean=tuple(config.get("image_mean", default.mean)),
                                       std=tuple(config.get("image_std", default.std)))
    if preprocessing.crop_size != image_size or preprocessing.size < preprocessing.crop_size:
        raise ConversionError(f"{path}: crop_size {preprocessing.crop_size} (after resizing to {preprocessing.size}) "
                              f"does not fit the vision tower's {image_size}x{image_size} input")
    return preprocessing


def load_clip_scorer(path: str | Path, *, batch_size: int = 64, precision: Precision = FP32) -> ClipScorer:
    """A ClipScorer from a transformers CLIP folder (model, tokenizer, image processor settings)."""
    model = load_clip(path, precision)
    folder = Path(path)
    try:
        tokenizer = FastTokenizer.from_folder(folder)
    except ValueError as e:
        raise ConversionError(f"{e}; expected {EXPECTED}") from e
    return ClipScorer(model, tokenizer, read_preprocessing(folder, model.config.vision.image_size),
                      batch_size=batch_size)
