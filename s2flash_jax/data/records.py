"""The precomputed training record, and sharded ArrayRecord files of them.

One record is one training example, serialised with msgpack as a self-describing map:

    {"format": "s2flash-record", "version": 1,
     "latent":            {"dtype": "float16", "shape": [H, W, C], "data": <bytes>},
     "caption_embedding": {"dtype": "float16", "shape": [n, D],    "data": <bytes>},
     "caption_mask":      {"dtype": "uint8",   "shape": [n],       "data": <bytes>},
     "caption": "the caption text"}

- `latent` is NHWC and already multiplied by the VAE's scaling factor (roughly unit variance). A
  prompts-only dataset (for image-free recipes such as TBCM) leaves it out.
- `caption_embedding` is the text encoder's last hidden state; `caption_mask` is 1 for real tokens.
  n <= the model's caption length: a writer may drop trailing padding, readers pad with zeros
  (padding positions are masked out of cross-attention, so their values never matter).
- Arrays are little-endian, C order. Floats are stored as float16 by default: the values are
  O(1)..O(100), far inside float16's range, and float16 keeps 11 mantissa bits against bfloat16's
  8 at the same size (half of float32). float32 and bfloat16 records are read as well.

Shards are named `{prefix}-{index:05d}-of-{count:05d}.array_record`, written to a hidden temporary
name and renamed when complete, so a visible shard is always whole. `dataset_info.json` beside
them describes the set (record count, shapes, dtypes, the encoders used).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers the numpy "bfloat16" dtype)
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from s2flash_jax.storage import resolve

RECORD_FORMAT = "s2flash-record"
RECORD_VERSION = 1
RECORD_KEYS = ("caption_embedding", "caption_mask", "caption")  # required; "latent" is optional
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
MASK_DTYPES = ("uint8", "bool", "int32", "int64")
_ARRAY_SPECS = {  # key -> (rank, allowed stored dtypes, what the array is)
    "latent": (3, FLOAT_DTYPES, "[H, W, C] latent"),
    "caption_embedding": (2, FLOAT_DTYPES, "[L, D] caption embedding"),
    "caption_mask": (1, MASK_DTYPES, "[L] caption mask"),
}
DATASET_INFO = "dataset_info.json"
SHARD_SUFFIX = ".array_record"
# One record per chunk: records are large (tens to hundreds of KiB), and grain reads them at
# random, so grouping records would make every read decode its neighbours too.
ARRAY_RECORD_OPTIONS = "group_size:1"


class DataError(ValueError):
    """A dataset, shard or record that cannot be used; the message names it and what was expected."""


# ---------------------------------------------------------------------------------------------
# One record


def encode_record(*, latent: np.ndarray | None, caption_embedding: np.ndarray, caption_mask: np.ndarray,
                  caption: str, dtype: str = "float16") -> bytes:
    """Serialise one example.

    latent: [H, W, C] (scaled by the VAE scaling factor), or None for a prompts-only record; caption_embedding: [n, D];
    caption_mask: [n] of 0/1; caption: the text. Floats are stored as `dtype`
    (float16 | bfloat16 | float32); the mask as uint8.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    caption_embedding = np.asarray(caption_embedding)
    caption_mask = np.asarray(caption_mask)
    if latent is not None and np.ndim(latent) != 3:
        raise ValueError(f"latent has shape {np.shape(latent)}, expected [H, W, C]")
    if caption_embedding.ndim != 2:
        raise ValueError(f"caption_embedding has shape {caption_embedding.shape}, expected [L, D]")
    if caption_mask.shape != caption_embedding.shape[:1]:
        raise ValueError(f"caption_mask has shape {caption_mask.shape}, expected ({caption_embedding.shape[0]},) "
                         "to match caption_embedding")
    if not isinstance(caption, str):
        raise ValueError(f"caption is a {type(caption).__name__}, expected str")
    return msgpack.packb({
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        **({} if latent is None else {"latent": _pack_array("latent", np.asarray(latent), dtype)}),
        "caption_embedding": _pack_array("caption_embedding", caption_embedding, dtype),
        "caption_mask": _pack_array("caption_mask", caption_mask, "uint8"),
        "caption": caption,
    }, use_bin_type=True)


def _pack_array(name: str, array: np.ndarray, dtype: str) -> dict[str, Any]:
    with np.errstate(over="ignore"):  # reported below, with the remedy
        stored = array.astype(np.dtype(dtype).newbyteorder("<"))
    # A silent overflow to inf would poison training much later; refuse it here.
    if np.isfinite(array).all() and not np.isfinite(stored.astype(np.float32)).all():
        raise ValueError(f"{name} has values beyond the {dtype} range (max |x| = {np.abs(array).max():.4g}); "
                         "store the records as float32")
    return {"dtype": dtype, "shape": list(array.shape), "data": stored.tobytes(order="C")}


def decode_record(raw: bytes, *, where: str = "record") -> dict[str, np.ndarray | str]:
    """Parse and check one record: arrays keep their stored dtype, `caption` is a str.

    `where` names the record in errors, e.g. "record 17 of shard .../train-00001-of-00004.array_record".
    Raises DataError for anything that is not a well-formed version-1 record.
    """
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise DataError(f"{where}: not a msgpack-encoded s2flash record ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
        raise DataError(f"{where}: not an s2flash record (expected a msgpack map with format={RECORD_FORMAT!r}; "
                        "write records with s2flash_jax.data.records.encode_record)")
    if obj.get("version") != RECORD_VERSION:
        raise DataError(f"{where}: record version {obj.get('version')!r}, expected {RECORD_VERSION}")
    missing = [k for k in RECORD_KEYS if k not in obj]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; expected keys {', '.join(RECORD_KEYS)}")
    record: dict[str, np.ndarray | str] = {key: _unpack_array(obj[key], key, where) for key in _ARRAY_SPECS
                                           if key in obj}
    if not isinstance(obj["caption"], str):
        raise DataError(f"{where}: caption is a {type(obj['caption']).__name__}, expected str")
    record["caption"] = obj["caption"]
    if record["caption_mask"].shape != record["caption_embedding"].shape[:1]:
        raise DataError(f"{where}: caption_mask has shape {record['caption_mask'].shape}, expected "
                        f"({record['caption_embedding'].shape[0]},) to match caption_embedding "
                        f"{record['caption_embedding'].shape}")
    return record


def _unpack_array(packed: Any, key: str, where: str) -> np.ndarray:
    rank, dtypes, what = _ARRAY_SPECS[key]
    if not isinstance(packed, dict) or not {"dtype", "shape", "data"} <= packed.keys():
        raise DataError(f"{where}: {key} is not an encoded array (expected a map with dtype, shape, data)")
    dtype, shape, data = packed["dtype"], packed["shape"], packed["data"]
    if dtype not in dtypes:
        raise DataError(f"{where}: {key} has dtype {dtype!r}, expected one of {', '.join(dtypes)}")
    if (not isinstance(shape, list) or len(shape) != rank
            or not all(isinstance(d, int) and d >= 0 for d in shape)):
        raise DataError(f"{where}: {key} has shape {shape!r}, expected a {what}")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * np_dtype.itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise DataError(f"{where}: {key} holds {size} bytes, expected {math.prod(shape) * np_dtype.itemsize} "
                        f"for {dtype} {tuple(shape)}")
    return np.frombuffer(data, np_dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Shards


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


# The names shard_name produces (and TFDS-style sets): groups prefix, index, count.
SHARD_NAME = re.compile(rf"(?P<prefix>.+)-(?P<index>\d{{5,}})-of-(?P<count>\d{{5,}}){re.escape(SHARD_SUFFIX)}")


def _temp_path(path: Path) -> Path:
    # Hidden and without the .array_record suffix, so no reader ever globs a half-written shard.
    return path.with_name(f".{path.name}.tmp")


def remove_temp_files(out_dir: str | os.PathLike, prefix: str) -> None:
    """Delete the temporary files an interrupted `write_shards` may have left."""
    for path in Path(out_dir).glob(f".{prefix}-*{SHARD_SUFFIX}.tmp"):
        path.unlink(missing_ok=True)


def count_records(path: str | os.PathLike) -> int:
    """Number of records in an ArrayRecord file; DataError if it is missing or not an ArrayRecord file."""
    where = resolve(path)
    if not where.is_file():
        raise DataError(f"shard {path} does not exist")
    path = str(where)
    reader = ArrayRecordReader(path)
    try:
        if not reader.ok():
            try:  # the reader only says why when asked to read
                reader.read([0])
                reason = "unreadable"
            except Exception as e:
                reason = str(e)
            raise DataError(f"{path} is not an ArrayRecord file ({reason}); expected shards written by "
                            "s2flash precompute or s2flash_jax.data.records.write_shards")
        return reader.num_records()
    finally:
        _close_quietly(reader)


def _close_quietly(reader: ArrayRecordReader) -> None:
    try:
        reader.close()
    except RuntimeError:  # closing a reader of a corrupt file re-raises the corruption
        pass


def write_shards(records: Iterable[bytes | Mapping[str, Any]], out_dir: str | os.PathLike, *,
                 records_per_shard: int, prefix: str = "train", num_records: int | None = None,
                 first_shard: int = 0, info: Mapping[str, Any] | None = None) -> list[Path]:
    """Write records into `{prefix}-NNNNN-of-NNNNN.array_record` shards and `dataset_info.json`.

    records: encoded records (bytes) or mappings of `encode_record`'s keyword arguments.
    num_records: the total number of records in the dataset (defaults to len(records)); it fixes
    the shard count in the names before anything is written.
    first_shard: resume support: shards before it are taken to exist already, and `records`
    starts with record first_shard * records_per_shard.
    info: extra fields for dataset_info.json (e.g. vae, text_encoder, caption_length).
    Each shard is written under a temporary name and renamed when complete. Returns the paths
    of the shards written by this call.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard={records_per_shard} must be >= 1")
    if num_records is None:
        if not hasattr(records, "__len__"):
            raise ValueError("write_shards needs num_records when records has no len()")
        num_records = len(records)  # type: ignore[arg-type]
    if num_records < 1:
        raise ValueError("write_shards was given no records")
    num_shards = math.ceil(num_records / records_per_shard)
    if not 0 <= first_shard <= num_shards:
        raise ValueError(f"first_shard={first_shard} outside 0..{num_shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir, prefix)

    iterator = iter(records)
    written = []
    for shard in range(first_shard, num_shards):
        start = shard * records_per_shard
        count = min(records_per_shard, num_records - start)
        path = out_dir / shard_name(prefix, shard, num_shards)
        _write_one_shard(path, _take(iterator, count, start, num_records))
        written.append(path)
    if next(iterator, None) is not None:
        raise ValueError(f"write_shards: records holds more than num_records={num_records} records")
    _write_dataset_info(out_dir, prefix, num_records, num_shards, records_per_shard, info or {})
    return written


def _take(iterator, count: int, start: int, num_records: int):
    for i in range(count):
        record = next(iterator, None)
        if record is None:
            raise ValueError(f"write_shards: records ended after {start + i} records, "
                             f"expected num_records={num_records}")
        yield record if isinstance(record, bytes) else encode_record(**record)


def _write_one_shard(path: Path, records: Iterable[bytes]) -> None:
    temp = _temp_path(path)
    writer = ArrayRecordWriter(str(temp), ARRAY_RECORD_OPTIONS)
    try:
        for raw in records:
            writer.write(raw)
        writer.close()
        os.replace(temp, path)
    finally:
        if writer.is_open():
            writer.close()
        temp.unlink(missing_ok=True)


def _write_dataset_info(out_dir: Path, prefix: str, num_records: int, num_shards: int,
                        records_per_shard: int, extra: Mapping[str, Any]) -> None:
    # Shapes come from the first record on disk, so a resumed run that wrote no shard itself
    # still describes the dataset.
    first_shard = out_dir / shard_name(prefix, 0, num_shards)
    reader = ArrayRecordReader(str(first_shard))
    try:
        first = decode_record(reader.read([0])[0], where=f"record 0 of shard {first_shard}")
    finally:
        reader.close()
    info = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "num_records": num_records,
        "num_shards": num_shards,
        "records_per_shard": records_per_shard,
        "shards": [shard_name(prefix, i, num_shards) for i in range(num_shards)],
        # None for a prompts-only dataset
        "latent_shape": list(first["latent"].shape) if "latent" in first else None,
        "latent_dtype": first["latent"].dtype.name if "latent" in first else None,
        "caption_length": first["caption_embedding"].shape[0],
        "caption_dim": first["caption_embedding"].shape[1],
        "caption_dtype": first["caption_embedding"].dtype.name,
        **extra,
    }
    write_json_atomic(out_dir / DATASET_INFO, info)


def write_json_atomic(path: Path, obj: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(temp, path)


def read_dataset_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's dataset_info.json, or None if it has none."""
    path = resolve(directory) / DATASET_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
