"""`s2flash convert export`: an s2flash model checkpoint -> a diffusers `SanaTransformer2DModel`
folder, or with a teacher pipeline (`--pipeline`), a whole diffusers pipeline folder whose kind
follows the checkpoint: a SANA-Sprint student (guidance_embeds=True) becomes a `SanaSprintPipeline`
(`SCMScheduler`), a flow model (a SANA-Sprint teacher, timestep_scale=0.001, or base SANA,
timestep_scale=1.0) a `SanaPipeline` (`FlowMatchEulerDiscreteScheduler`, shift = the checkpoint's
`sampling.flow_shift`, else 1.0). Both take the VAE, text encoder and tokenizer from the teacher
pipeline; PIPELINE_KINDS holds what differs. A TwinFlow student has no diffusers form and is refused.
A checkpoint with LoRA adapters is exported merged, each adapter folded into its base weight
(`s2flash convert export-lora`, conversion/lora.py, writes the adapters alone). A quantized checkpoint
(`s2flash quantize`) is exported dequantized: each int8/int4 kernel times its per-channel scale, in the
scale's dtype (the source's) unless --dtype says otherwise.

The weights stream out one JAX parameter at a time (read alone from the checkpoint, cut into its
per-block diffusers tensors, written into safetensors shards), so an export holds about one
parameter in memory, never the whole model. By default tensors keep the dtype they are stored in,
which makes diffusers -> s2flash -> diffusers bit-identical.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from conversion.errors import ConversionError
from conversion.safetensors_io import TensorSpec, write_sharded
from conversion.sana_diffusers import JAX_ONLY, Row, key_table, param_shapes, tensor_keys
from conversion.sources import DIFFUSERS_CLASS
from s2flash_jax.flows.trigflow import SIGMA_DATA
from s2flash_jax.model_checkpoint import read_metadata, read_model_config, read_stored_params
from s2flash_jax.models.layers import LoRA
from s2flash_jax.models.lora import ADAPTER_NAMES, folded_kernel
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.outputs import fresh_output_dir
from s2flash_jax.storage import resolve
# A quantized checkpoint's parameters read as the dequantized model's; a float checkpoint's as stored.
from s2flash_jax.quantize import dequantized_stored_params, read_dequantized_params

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # as diffusers' SANA conversion script writes them
PIPELINE_COMPONENTS = ("vae", "text_encoder", "tokenizer")
NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class PipelineKind:
    """What differs between the pipeline folders --pipeline writes: the pipeline's class, its
    scheduler's class, and that scheduler's config (given the checkpoint's directory)."""
    pipeline: str
    scheduler: str
    scheduler_config: Callable[[Path], dict[str, Any]]


def _flow_shift(ckpt: Path) -> float:
    """The checkpoint's model.json `sampling.flow_shift` (what `s2flash sample` uses), else 1.0."""
    shift = (read_metadata(ckpt).get("sampling") or {}).get("flow_shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ConversionError(f"{ckpt / 'model.json'}: sampling.flow_shift {shift!r} is not a positive number")
    return float(shift)


# keyed by SanaConfig.guidance_embeds
PIPELINE_KINDS = {
    True: PipelineKind("SanaSprintPipeline", "SCMScheduler", lambda ckpt: {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "prediction_type": "trigflow", "sigma_data": SIGMA_DATA}),
    # SanaPipeline feeds the transformer 1000·s·timestep_scale, as SanaConfig.flow_time_scale does.
    False: PipelineKind("SanaPipeline", "FlowMatchEulerDiscreteScheduler", lambda ckpt: {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": _flow_shift(ckpt)}),
}


@dataclasses.dataclass
class ExportResult:
    config: SanaConfig
    files: list[Path]
    tensors: int
    dropped: list[str]  # JAX parameters and checkpoint components diffusers has no place for
    pipeline: str | None = None  # the pipeline class written with --pipeline


def _diffusers_version() -> dict[str, str]:
    try:
        return {"_diffusers_version": importlib.metadata.version("diffusers")}
    except importlib.metadata.PackageNotFoundError:
        return {}


def check_stored_params(ckpt: Path, config: SanaConfig) -> dict[str, Any]:
    """The checkpoint's stored parameters (path -> shape/dtype), checked against its config."""
    expected = param_shapes(config)
    stored = dequantized_stored_params(ckpt)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = [f"{p} {tuple(stored[p].shape)} (expected {expected[p]})" for p in expected
             if p in stored and tuple(stored[p].shape) != expected[p]]
    if missing or extra or wrong:
        raise ConversionError(f"{ckpt}: its parameters do not fit its model.json config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}")
    return stored


def export_dtype(dtype: str | None) -> np.dtype | None:
    """--dtype's numpy dtype (None: keep the stored dtypes)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES.get(dtype)


def read_exportable_config(ckpt: Path) -> SanaConfig:
    """The checkpoint's architecture, refused if diffusers has no form of it."""
    config = read_model_config(ckpt)
    if config.twinflow_embeds:
        raise ConversionError(f"{ckpt} is a TwinFlow student (twinflow_embeds=True): its target-time and "
                              "negative-time embeddings have no place in diffusers' SanaTransformer2DModel, which "
                              "would sample it as a plain flow model; sample it with `s2flash sample` instead")
    return config


class _ParamStream:
    """Produces diffusers tensors by key, reading the checkpoint's parameters in the order they are
    asked for, a group of up to GROUP_BYTES (or one larger parameter) at a time, each once. A kernel
    with LoRA adapters comes with them folded in (`lora`: their rank and alpha)."""

    GROUP_BYTES = 256 * 2**20

    def __init__(self, ckpt: Path, stored: dict[str, Any], dtype: np.dtype | None, lora: LoRA | None = None):
        self.ckpt, self.stored, self.dtype, self.lora = ckpt, stored, dtype, lora
        self.sources: dict[str, tuple[Any, int | None]] = {}  # torch key -> (row, block)
        self.order: list[str] = []  # JAX parameters in the order their tensors are written
        self._loaded: dict[str, np.ndarray] = {}

    def add(self, key: str, row: Any, block: int | None) -> None:
        self.sources[key] = (row, block)
        if not self.order or self.order[-1] != row.jax_path:
            self.order.append(row.jax_path)

    def __call__(self, key: str) -> np.ndarray:
        row, block = self.sources[key]
        if row.jax_path not in self._loaded:
            self._loaded = {}  # drop the previous group before reading the next
            self._loaded = self._read(self._group_from(row.jax_path))
        value = self._loaded[row.jax_path]
        return np.ascontiguousarray(row.layout.to_torch(value if block is None else value[block]))

    def _group_from(self, first: str) -> list[str]:
        group, size = [], 0
        for path in self.order[self.order.index(first):]:
            nbytes = int(np.prod(self.stored[path].shape, dtype=np.int64)) * np.dtype(self.stored[path].dtype).itemsize
            if group and size + nbytes > self.GROUP_BYTES:
                break
            group.append(path)
            size += nbytes
        return group

    def _read(self, group: list[str]) -> dict[str, np.ndarray]:
        adapters = {path: [path.removesuffix("kernel") + name for name in ADAPTER_NAMES] for path in group
                    if path.endswith("/kernel") and path.removesuffix("kernel") + ADAPTER_NAMES[0] in self.stored}
        values = read_dequantized_params(self.ckpt, group + [name for names in adapters.values() for name in names],
                                         read=read_stored_params)
        for path, (a, b) in adapters.items():
            values[path] = np.asarray(folded_kernel(values[path], values[a], values[b], self.lora.scale))
        return {path: self._cast(values[path], path) for path in group}

    def _cast(self, value: np.ndarray, path: str) -> np.ndarray:
        if self.dtype is None or value.dtype == self.dtype:
            return value
        with np.errstate(over="ignore"):
            cast = value.astype(self.dtype)
        if not np.isfinite(cast).all() and np.isfinite(value).all():
            raise ConversionError(f"parameter {path} has values beyond the range of {self.dtype} "
                                  f"(max |x| = {float(np.abs(value.astype(np.float32)).max()):.4g}); export it in a "
                                  f"wider --dtype")
        return cast


def stream_rows(ckpt: Path, config: SanaConfig, rows: list[Row], dtype: np.dtype | None
                ) -> tuple[list[tuple[str, TensorSpec]], Callable[[str], np.ndarray]]:
    """The torch tensors of `rows` read from the checkpoint: their specs (key, shape, dtype) and a
    function producing each by key (a kernel with LoRA adapters comes with them folded in). Rows in
    key_table order keep each parameter's tensors together, so each parameter is read once."""
    stream = _ParamStream(ckpt, check_stored_params(ckpt, config), dtype, config.lora)
    specs = []
    for row in rows:
        stored = stream.stored[row.jax_path]
        for key, block in tensor_keys(row, config.num_layers):
            stream.add(key, row, block)
            torch_shape = row.layout.torch_shape(tuple(stored.shape) if block is None else tuple(stored.shape[1:]))
            specs.append((key, TensorSpec(tuple(torch_shape), dtype or np.dtype(stored.dtype))))
    return specs, stream


def write_transformer(ckpt: Path, config: SanaConfig, folder: Path, *, dtype: np.dtype | None,
                      max_shard_bytes: int) -> tuple[list[Path], int]:
    """config.json and the safetensors shards of a diffusers transformer folder (LoRA adapters folded
    into their base weights). Returns (files, tensors)."""
    specs, stream = stream_rows(ckpt, config, key_table(config), dtype)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_sharded(folder, specs, stream, max_shard_bytes=max_shard_bytes)
    diffusers_config = {"_class_name": DIFFUSERS_CLASS, **_diffusers_version(), **config.to_diffusers()}
    (folder / "config.json").write_text(json.dumps(diffusers_config, indent=2) + "\n")
    return [folder / "config.json", *files], len(specs)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"--pipeline: cannot read {what} {path}: {e}") from e


def check_teacher_pipeline(pipeline: Path, config: SanaConfig) -> dict[str, Any]:
    """The teacher pipeline's model_index.json, checked to have the parts the exported pipeline
    takes from it and to fit the transformer (text width = caption_channels, latent channels =
    in_channels)."""
    index = _read_json(pipeline / "model_index.json", "the pipeline index")
    missing = [name for name in PIPELINE_COMPONENTS if not (pipeline / name).is_dir() or name not in index]
    if missing:
        raise ConversionError(f"--pipeline {pipeline} lacks {', '.join(missing)}; expected a diffusers SanaPipeline or "
                              f"SanaSprintPipeline folder (model_index.json with vae, text_encoder, tokenizer)")
    text = _read_json(pipeline / "text_encoder" / "config.json", "the text encoder config")
    width = text.get("hidden_size", text.get("text_config", {}).get("hidden_size"))
    if width is not None and width != config.caption_channels:
        raise ConversionError(f"--pipeline: its text encoder is {width} wide but the transformer reads captions of "
                              f"caption_channels={config.caption_channels}")
    vae = _read_json(pipeline / "vae" / "config.json", "the VAE config")
    if vae.get("latent_channels", config.in_channels) != config.in_channels:
        raise ConversionError(f"--pipeline: its VAE has {vae['latent_channels']} latent channels but the transformer "
                              f"takes in_channels={config.in_channels}")
    return index


def write_pipeline(staging: Path, pipeline: Path, index: dict[str, Any], kind: PipelineKind,
                   scheduler_config: dict[str, Any]) -> None:
    """Everything of a `kind` pipeline folder but the transformer: the teacher pipeline's VAE, text
    encoder and tokenizer, the scheduler config and model_index.json."""
    for name in PIPELINE_COMPONENTS:
        shutil.copytree(pipeline / name, staging / name)
    scheduler = staging / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_text(json.dumps({
        "_class_name": kind.scheduler, **_diffusers_version(), **scheduler_config}, indent=2) + "\n")
    (staging / "model_index.json").write_text(json.dumps({
        "_class_name": kind.pipeline, **_diffusers_version(),
        **{name: index[name] for name in PIPELINE_COMPONENTS},
        "scheduler": ["diffusers", kind.scheduler], "transformer": ["diffusers", DIFFUSERS_CLASS]}, indent=2) + "\n")


def export_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str | None = None, pipeline: str | Path | None = None,
                      force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
    """Write the model checkpoint `ckpt` as a diffusers transformer folder at `out` (dtype: fp32,
    fp16, bf16, or None to keep the stored dtypes), or with `pipeline` (a SanaPipeline folder of the
    teacher) as a pipeline folder whose transformer/ is the checkpoint's: a SanaSprintPipeline for a
    student (guidance_embeds), a SanaPipeline for a flow model (see PIPELINE_KINDS)."""
    ckpt, out = resolve(ckpt), resolve(out)
    numpy_dtype = export_dtype(dtype)
    config = read_exportable_config(ckpt)
    kind = PIPELINE_KINDS[config.guidance_embeds]
    if pipeline is not None:  # every check before anything is written
        index = check_teacher_pipeline(Path(pipeline), config)
        scheduler_config = kind.scheduler_config(ckpt)
    with fresh_output_dir(out, force=force) as staging:
        transformer = staging if pipeline is None else staging / "transformer"
        files, tensors = write_transformer(ckpt, config, transformer, dtype=numpy_dtype,
                                           max_shard_bytes=max_shard_bytes)
        if pipeline is not None:
            write_pipeline(staging, Path(pipeline), index, kind, scheduler_config)
    dropped = [p for p in dequantized_stored_params(ckpt) if p.startswith(JAX_ONLY)]
    extra_files = [p.name for p in ckpt.iterdir() if p.name not in ("model.json", "params")]
    files = [out / f.relative_to(staging) for f in files]
    return ExportResult(config, files, tensors, dropped + extra_files, None if pipeline is None else kind.pipeline)
