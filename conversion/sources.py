"""What a conversion reads from: a diffusers model folder or an original NVlabs SANA checkpoint.

Both are opened as a `TensorSource` (keys, shape/dtype of each, and reading one tensor at a time);
`detect_format` says which of the two (or an s2flash model checkpoint) a path holds, so a wrong
`--format` gets an error that names what the path really is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from conversion.errors import ConversionError
from conversion.safetensors_io import FLOAT_DTYPES, SafetensorsFile, SafetensorsFiles, TensorSpec, weight_files
from conversion.sana_diffusers import Row, ShapeProblems

DIFFUSERS = "diffusers"
SANA = "sana"
S2FLASH = "s2flash"
FORMATS = (DIFFUSERS, SANA)
DIFFUSERS_CLASS = "SanaTransformer2DModel"
# Keys that only an original SANA / only a diffusers state dict has: how a bare weights file is told apart.
ORIGINAL_MARKERS = ("x_embedder.", "blocks.", "t_embedder.", "final_layer.")
DIFFUSERS_MARKERS = ("transformer_blocks.", "patch_embed.", "time_embed.", "proj_out.")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...

    def spec(self, name: str) -> TensorSpec: ...

    def read(self, name: str) -> np.ndarray: ...


def check_tensors(source: TensorSource, expected: Mapping[str, tuple[int, ...]], what: str, mismatch: str, *,
                  keys: Iterable[str] | None = None, shown: int = 2) -> None:
    """One ConversionError if the source's tensors (`keys`, default all) are not exactly `expected`
    (torch key -> shape) or are not floating point. mismatch: the message's form, with {what} and
    {problems} (the missing, unexpected and mis-shaped keys, counted, the first `shown` of each)."""
    found = {key: source.spec(key).shape for key in (source.keys() if keys is None else keys)}
    problems = ShapeProblems.compare(expected, found)
    if problems:
        raise ConversionError(mismatch.format(what=what, problems=problems.summary(shown)))
    not_float = [f"{key} ({source.spec(key).dtype})" for key in expected if source.spec(key).dtype not in FLOAT_DTYPES]
    if not_float:
        raise ConversionError(f"{what}: expected floating-point weights, found {', '.join(not_float[:3])}")


def fill_params(model: nnx.Module, rows: Sequence[Row], source: TensorSource, dtype: Any) -> nnx.Module:
    """Set each row's parameter of `model` (built with nnx.eval_shape: no random weights are made and
    thrown away) from its source tensor, in the JAX layout and `dtype`, one tensor at a time."""
    variables = {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for row in rows:
        variables[row.jax_path].set_value(jnp.asarray(row.layout.to_jax(source.read(row.torch_key)), dtype))
    return model


@dataclasses.dataclass
class DiffusersFolder:
    """A diffusers model folder (a `SanaTransformer2DModel`, an `AutoencoderDC`): its config.json dict
    and its weights."""

    path: Path
    config: dict[str, Any]
    tensors: SafetensorsFiles
    files: list[Path]


@dataclasses.dataclass
class OriginalCheckpoint:
    """An original NVlabs SANA checkpoint: its state dict (the `state_dict` entry of a training
    checkpoint, or the whole file) and the file's other top-level entries (optimizer, ema, ...)."""

    path: Path
    tensors: TensorSource
    other_entries: list[str]


def _has_marker(keys, markers) -> bool:
    return any(key.startswith(markers) for key in keys)


def detect_format(path: str | Path) -> str:
    """DIFFUSERS, SANA or S2FLASH for what `path` holds; ConversionError if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{str(path)!r} does not exist")
    if path.is_dir():
        if (path / "model.json").is_file():
            return S2FLASH
        if (path / "config.json").is_file() or (path / "model_index.json").is_file():
            return DIFFUSERS
        raise ConversionError(f"{path} is a folder without config.json (diffusers) or model.json (s2flash); expected a "
                              f"diffusers transformer folder, an s2flash model checkpoint or an original SANA .pth/.safetensors file")
    if path.suffix in TORCH_SUFFIXES:
        return SANA
    if path.suffix == ".safetensors":
        keys = SafetensorsFile(path).keys()
        if _has_marker(keys, ORIGINAL_MARKERS):
            return SANA
        if _has_marker(keys, DIFFUSERS_MARKERS):
            raise ConversionError(f"{path} holds diffusers key names (e.g. transformer_blocks.*) but no config: pass the "
                                  f"diffusers transformer folder that contains it and its config.json")
        raise ConversionError(f"{path} holds neither original SANA keys (x_embedder.*, blocks.N.*) nor diffusers "
                              f"SanaTransformer2DModel keys; it is not a SANA checkpoint")
    raise ConversionError(f"{path} is a file of unknown kind; expected an original SANA checkpoint (.pth or "
                          f".safetensors) or a diffusers transformer folder")


def check_format(path: str | Path, expected: str) -> None:
    """Raise a ConversionError if `path` is not in format `expected`, naming the format it is in."""
    found = detect_format(path)
    if found == expected:
        return
    described = {DIFFUSERS: "a diffusers transformer folder", SANA: "an original NVlabs SANA checkpoint file",
                 S2FLASH: "an s2flash model checkpoint (already converted)"}
    hint = f"; use --format {found}" if found in FORMATS else ""
    raise ConversionError(f"--format {expected} expects {described[expected]} but {path} is {described[found]}{hint}")


def read_json_object(path: Path, label: str, expected: str) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not valid JSON or not an object is a ConversionError
    starting with `label` and naming what was `expected`."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{label} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConversionError(f"{label} is not {expected}")
    return value


def open_diffusers(path: str | Path, class_name: str = DIFFUSERS_CLASS,
                   subfolder: str = "transformer") -> DiffusersFolder:
    """A diffusers `class_name` model folder, or the `subfolder`/ of a diffusers pipeline folder
    (config and safetensors headers only; tensors are read when asked for)."""
    path = Path(path)
    expected = f"expected a diffusers {class_name} folder or a pipeline folder with {subfolder}/"
    if not path.exists():
        raise ConversionError(f"{str(path)!r} does not exist; {expected}")
    if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
        path = path / subfolder  # a whole pipeline: its part
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{path} has no config.json; {expected}")
    config = read_json_object(config_path, f"{config_path}", "a JSON object")
    found = config.get("_class_name", class_name)
    if found != class_name:
        article = "an" if class_name[0] in "AEIOU" else "a"
        raise ConversionError(f"{config_path} is the config of a {found}, not of {article} {class_name}")
    files = weight_files(path)
    return DiffusersFolder(path, config, SafetensorsFiles([SafetensorsFile(f) for f in files]), files)


class TorchStateDict:
    """A torch state dict's tensors as numpy arrays (bfloat16 as ml_dtypes.bfloat16, bit for bit)."""

    def __init__(self, state_dict: dict[str, Any]):
        import torch

        self._tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        self._torch = torch

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        tensor = self._tensors[name]
        return TensorSpec(tuple(tensor.shape), self._numpy_dtype(tensor.dtype))

    def _numpy_dtype(self, dtype) -> np.dtype:
        if dtype == self._torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self._torch.empty((), dtype=dtype).numpy().dtype)

    def read(self, name: str) -> np.ndarray:
        tensor = self._tensors[name].detach().cpu().contiguous()
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _load_torch_file(path: Path) -> Any:
    import torch

    def unreadable(e: Exception) -> ConversionError:
        return ConversionError(f"{path} cannot be read as a PyTorch checkpoint (truncated, or not one): "
                               f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")

    try:
        # mmap: tensors are paged in when converted, not all at once; weights_only: no code from the file runs.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file; all mean "unreadable"
        if "mmap" not in str(e):
            raise unreadable(e) from e
    try:  # files in torch's legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise unreadable(e) from e


def open_original(path: str | Path) -> OriginalCheckpoint:
    """An original SANA checkpoint: a torch file (`{"state_dict": ...}` as SANA's trainer saves it,
    or a bare state dict) or a .safetensors file with the original key names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return OriginalCheckpoint(path, SafetensorsFile(path), [])
    loaded = _load_torch_file(path)
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}; expected a state dict or a dict with 'state_dict'")
    state_dict = loaded.get("state_dict", loaded)
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{path}: its 'state_dict' entry is a {type(state_dict).__name__}, not a state dict")
    others = sorted(k for k in loaded if k != "state_dict") if "state_dict" in loaded else []
    return OriginalCheckpoint(path, TorchStateDict(state_dict), others)
