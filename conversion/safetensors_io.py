"""safetensors files read and written one tensor at a time, and diffusers' sharded layout of them.

A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}) and the tensors'
bytes back to back. Reading with plain file reads (no mmap) keeps only the tensor being converted in
memory, and writing from a list of specs lets each tensor be produced just before it is written, so
converting a model holds about one copy of its weights.

Sharded folders (diffusers' `save_pretrained`): `<prefix>.safetensors`, or
`<prefix>-0000k-of-0000n.safetensors` plus `<prefix>.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.errors import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = frozenset(dtype for name, dtype in DTYPES.items() if name.startswith(("F", "BF")))
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SafetensorsFile:
    """One safetensors file: its header is read and checked against the file size when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise self._corrupt(f"it has {size} bytes, less than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_HEADER_LIMIT, size - 8):
                raise self._corrupt(f"its header length field says {header_len} bytes but the file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._corrupt(f"its JSON header does not parse ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
        data_size = size - self._data_start
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(n) for n in entry["shape"])
                begin, end = (int(n) for n in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._corrupt(f"its header entry for {name!r} is malformed ({e!r})") from e
            spec = TensorSpec(shape, dtype)
            if end - begin != spec.nbytes:
                raise self._corrupt(f"tensor {name!r} {shape} {entry['dtype']} should take {spec.nbytes} bytes, "
                                    f"its offsets give {end - begin}")
            if end > data_size:
                raise self._corrupt(f"tensor {name!r} ends at byte {end} of the data but the file holds only "
                                    f"{data_size} data bytes (truncated?)")
            self._entries[name] = (spec, begin, end)

    def _corrupt(self, why: str) -> ConversionError:
        return ConversionError(f"{self.path} is not a complete safetensors file: {why}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        return self._entries[name][0]

    def read(self, name: str) -> np.ndarray:
        spec, begin, _ = self._entries[name]
        out = np.empty(spec.shape, spec.dtype)
        with self.path.open("rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != spec.nbytes:
            raise self._corrupt(f"reading tensor {name!r} returned {got} of {spec.nbytes} bytes")
        return out


class SafetensorsFiles:
    """Several safetensors files read as one set of tensors (a sharded checkpoint)."""

    def __init__(self, files: Sequence[SafetensorsFile]):
        self.files = list(files)
        self._file_of: dict[str, SafetensorsFile] = {}
        for file in self.files:
            for name in file.keys():
                if name in self._file_of:
                    raise ConversionError(f"tensor {name!r} is in both {self._file_of[name].path} and {file.path}")
                self._file_of[name] = file

    def keys(self) -> list[str]:
        return list(self._file_of)

    def spec(self, name: str) -> TensorSpec:
        return self._file_of[name].spec(name)

    def read(self, name: str) -> np.ndarray:
        return self._file_of[name].read(name)


def weight_files(folder: Path, prefix: str = DIFFUSERS_WEIGHTS) -> list[Path]:
    """The safetensors files of a diffusers model folder: the index's shards, or the single file."""
    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index} is not a safetensors index (expected JSON with a 'weight_map'): {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ConversionError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return [folder / name for name in shards]
    single = folder / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise ConversionError(f"{folder} has no {single.name} or {index.name}"
                          + (f" (found {', '.join(found)})" if found else " and no *.safetensors at all"))


def _header_bytes(entries: dict) -> bytes:
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # tensor data starts 8-byte aligned


def plan_shards(specs: Sequence[tuple[str, TensorSpec]], max_shard_bytes: int) -> list[list[tuple[str, TensorSpec]]]:
    """Greedy split in order: a shard closes before the tensor that would take it past max_shard_bytes."""
    shards: list[list[tuple[str, TensorSpec]]] = [[]]
    size = 0
    for name, spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, spec))
        size += spec.nbytes
    return shards


def write_sharded(folder: Path, specs: Sequence[tuple[str, TensorSpec]], produce: Callable[[str], np.ndarray], *,
                  max_shard_bytes: int, prefix: str = DIFFUSERS_WEIGHTS) -> list[Path]:
    """Write the tensors `specs` names into `folder` as diffusers does, calling produce(name) for
    each tensor just before its bytes are written (in the order of `specs`). Returns the files."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        write_file(folder / name, shard, produce)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(spec.nbytes for _, spec in specs)},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard}}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / name for name in names]


def write_file(path: Path, specs: Iterable[tuple[str, TensorSpec]], produce: Callable[[str], np.ndarray]) -> None:
    """One safetensors file with the tensors `specs` names, each produced just before it is written."""
    specs = list(specs)
    entries, offset = {}, 0
    for name, spec in specs:
        entries[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    entries["__metadata__"] = {"format": "pt"}  # transformers/diffusers refuse files without it
    header = _header_bytes(entries)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, spec in specs:
            tensor = produce(name)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"tensor {name}: produced {tensor.shape} {tensor.dtype}, "
                                 f"promised {spec.shape} {spec.dtype}")
            f.write(memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)))
