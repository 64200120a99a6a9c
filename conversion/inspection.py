"""`s2flash convert inspect`: what a checkpoint is, without converting it.

Reads headers only (safetensors headers, torch's lazily loaded tensors, orbax metadata): format,
architecture config (and where it comes from), parameter count, dtypes, and every key the
converter would not understand or would miss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from conversion.errors import ConversionError
from conversion.exporter import check_stored_params
from conversion.importer import ImportPlan, diffusers_plan, original_plan
from conversion.safetensors_io import TensorSpec
from conversion.sana_diffusers import ShapeProblems
from conversion.sana_original import NULL_CAPTION, POS_EMBED, infer_config, load_config_arg
from conversion.sources import DIFFUSERS, S2FLASH, SANA, check_format, detect_format, open_diffusers, open_original
from s2flash_jax.model_checkpoint import read_metadata, read_model_config, stored_params
from s2flash_jax.models.sana import SanaConfig


@dataclasses.dataclass
class Inspection:
    path: Path
    format: str
    description: str
    specs: dict[str, TensorSpec]  # every tensor / parameter
    config: SanaConfig | None = None
    config_origin: str = ""
    config_problem: str = ""  # why there is no config
    problems: ShapeProblems | None = None  # keys against the config's model
    notes: list[str] = dataclasses.field(default_factory=list)

    def report(self) -> str:
        counts: dict[str, list[int]] = {}
        for spec in self.specs.values():
            entry = counts.setdefault(str(spec.dtype), [0, 0, 0])
            entry[0] += 1
            entry[1] += int(np.prod(spec.shape, dtype=np.int64))
            entry[2] += spec.nbytes
        total = sum(c[1] for c in counts.values())
        lines = [f"source: {self.path}", f"format: {self.format} ({self.description})"]
        if self.config is not None:
            lines.append(f"config (from {self.config_origin}):")
            lines += [f"  {key} = {value!r}" for key, value in dataclasses.asdict(self.config).items()
                      if key not in SanaConfig.EXECUTION_KEYS]
        else:
            lines.append(f"config: cannot be determined: {self.config_problem}")
        lines.append(f"parameters: {total:,} in {len(self.specs)} tensors "
                     f"({sum(c[2] for c in counts.values()) / 1e9:.3f} GB)")
        lines += [f"  {dtype}: {n:,} parameters in {k} tensors" for dtype, (k, n, _) in sorted(counts.items())]
        if self.problems is None:
            lines.append("keys: not checked (no config)" if self.config is None else f"keys: {self.config_problem}")
        elif self.problems:
            lines.append("keys that do not fit the model:")
            lines += [f"  {line}" for line in self.problems.details().splitlines()]
        else:
            lines.append("keys: all understood")
        lines += self.notes
        return "\n".join(lines)


def _check_keys(found: dict[str, TensorSpec], plan: ImportPlan, extras: tuple[str, ...] = ()) -> ShapeProblems:
    return ShapeProblems.compare(plan.expected, {k: s.shape for k, s in found.items() if k not in extras})


def _inspect_diffusers(path: Path, config_arg: str | None) -> Inspection:
    folder = open_diffusers(path)
    specs = {key: folder.tensors.spec(key) for key in folder.tensors.keys()}
    result = Inspection(folder.path, DIFFUSERS, f"diffusers transformer folder, {len(folder.files)} safetensors "
                        f"file{'s' if len(folder.files) > 1 else ''}", specs)
    try:
        result.config = SanaConfig.from_diffusers(folder.config)
        result.config_origin = "config.json"
        result.problems = _check_keys(specs, diffusers_plan(result.config))
    except (TypeError, ValueError) as e:
        result.config_problem = f"config.json: {e}"
    return result


def _inspect_original(path: Path, config_arg: str | None) -> Inspection:
    original = open_original(path)
    specs = {key: original.tensors.spec(key) for key in original.tensors.keys()}
    kind = "safetensors" if path.suffix == ".safetensors" else "torch file"
    entries = f", other entries: {', '.join(original.other_entries)}" if original.other_entries else ""
    result = Inspection(path, SANA, f"original NVlabs SANA checkpoint, {kind}{entries}", specs)
    try:
        given = None if config_arg is None else load_config_arg(config_arg)
        result.config, result.config_origin = infer_config(specs, given)
        result.problems = _check_keys(specs, original_plan(result.config), (NULL_CAPTION, POS_EMBED))
    except ConversionError as e:
        result.config_problem = str(e)
    kept = [f"{NULL_CAPTION} (learned null caption)"] * (NULL_CAPTION in specs)
    kept += ["logvar_linear (SANA-Sprint logvar head)"] * ("logvar_linear.weight" in specs)
    if kept:
        result.notes.append(f"kept on import, dropped by diffusers: {', '.join(kept)}")
    if POS_EMBED in specs:
        result.notes.append(f"not converted: {POS_EMBED} (a fixed buffer, recomputed from the config)")
    return result


def _inspect_s2flash(path: Path, config_arg: str | None) -> Inspection:
    stored = stored_params(path)
    specs = {key: TensorSpec(tuple(s.shape), np.dtype(s.dtype)) for key, s in stored.items()}
    meta: dict[str, Any] = read_metadata(path)
    result = Inspection(path, S2FLASH, "s2flash model checkpoint", specs, config=read_model_config(path),
                        config_origin="model.json")
    try:
        check_stored_params(path, result.config)
        result.problems = ShapeProblems([], [], [])
    except ConversionError as e:
        result.config_problem = str(e)
        result.problems = None
    if "converted_from" in meta:
        origin = meta["converted_from"]
        result.notes.append(f"converted from: {origin.get('format')} {origin.get('path')} (config: {origin.get('config')})")
    others = sorted(p.name for p in path.iterdir() if p.name not in ("model.json", "params"))
    if others:
        result.notes.append(f"components: {', '.join(others)}")
    return result


def inspect_checkpoint(src: str | Path, source_format: str | None = None, config: str | None = None) -> Inspection:
    """What `src` holds; source_format (diffusers, sana) is checked if given, else detected."""
    src = Path(src)
    if source_format is not None:
        check_format(src, source_format)
    found = detect_format(src)
    if config is not None and found != SANA:
        raise ConversionError("--config is only needed for original SANA checkpoints (--format sana)")
    inspect = {DIFFUSERS: _inspect_diffusers, SANA: _inspect_original, S2FLASH: _inspect_s2flash}[found]
    return inspect(src, config)
