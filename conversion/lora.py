"""`s2flash convert export-lora`: the LoRA adapters of an s2flash model checkpoint alone, as the
diffusers LoRA file `SanaPipeline.load_lora_weights` (SanaLoraLoaderMixin) loads onto a diffusers
transformer that holds the base weights.

The file is PEFT's layout under diffusers' `transformer.` prefix: per block and adapted layer,
`transformer.transformer_blocks.{i}.<layer>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
(with trailing 1x1 axes for the Mix-FFN's convolutions). The rows come from the base weights' key
table (conversion/sana_diffusers.py), so each adapter is cut from its stacked [layers, ...] array and
laid out exactly as its base weight is. The scale alpha/r is folded into lora_B: the file holds
alpha = r (scale 1), which is what diffusers assumes for a file without alphas, and which every
loader of this format reads the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from conversion.errors import ConversionError
from conversion.exporter import export_dtype, read_exportable_config, stream_rows
from conversion.layouts import Layout
from conversion.safetensors_io import write_file
from conversion.sana_diffusers import Row, key_table
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.outputs import fresh_output_dir

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, what load_lora_weights reads
PREFIX = "transformer."  # SanaLoraLoaderMixin loads the keys under it into the transformer


@dataclasses.dataclass
class LoraExportResult:
    config: SanaConfig
    file: Path
    tensors: int


def scaled(layout: Layout, scale: float) -> Layout:
    """`layout` with the tensor multiplied by `scale` on the way to torch (divided on the way back), in
    float32 and back to the tensor's dtype (a bf16 scale would round it)."""
    if scale == 1.0:
        return layout

    def times(x: np.ndarray, factor: float) -> np.ndarray:
        return (x.astype(np.float32) * np.float32(factor)).astype(x.dtype)

    return Layout(f"{layout.name}*{scale:g}", lambda w: layout.to_jax(times(w, 1 / scale)),
                  lambda a: layout.to_torch(times(a, scale)), layout.torch_shape)


def lora_rows(config: SanaConfig) -> list[Row]:
    """The LoRA file's tensors: for each adapted layer's kernel row of key_table, its lora_A and
    lora_B rows in the kernel's layout (alpha/r folded into lora_B)."""
    if config.lora is None:
        return []
    kernels = {f"transformer_blocks.{{i}}.{layer}.weight" for layer in config.lora_layers}
    rows = []
    for row in key_table(config):
        if row.torch_key in kernels:
            torch_module, jax_module = row.torch_key.removesuffix(".weight"), row.jax_path.removesuffix("/kernel")
            rows += [Row(f"{PREFIX}{torch_module}.lora_A.weight", f"{jax_module}/lora_a", row.layout),
                     Row(f"{PREFIX}{torch_module}.lora_B.weight", f"{jax_module}/lora_b",
                         scaled(row.layout, config.lora.scale))]
    if len(rows) != 2 * len(config.lora_layers):
        raise RuntimeError(f"key_table has no kernel row for some of the adapted layers {config.lora_layers}")
    return rows


def export_lora(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                force: bool = False) -> LoraExportResult:
    """Write the adapters of the model checkpoint `ckpt` as `out`/pytorch_lora_weights.safetensors
    (dtype: fp32, fp16, bf16, or None to keep the stored dtype). The folder appears only when complete;
    an existing non-empty `out` is replaced only with force."""
    ckpt, out = Path(ckpt), Path(out)
    numpy_dtype = export_dtype(dtype)
    config = read_exportable_config(ckpt)
    if config.lora is None:
        raise ConversionError(f"{ckpt} has no LoRA adapters (its model.json has lora_rank=0); export the whole model "
                              f"with `s2flash convert export` instead")
    specs, produce = stream_rows(ckpt, config, lora_rows(config), numpy_dtype)
    with fresh_output_dir(out, force=force) as staging:
        write_file(staging / LORA_WEIGHTS, specs, produce)
    return LoraExportResult(config, out / LORA_WEIGHTS, len(specs))
