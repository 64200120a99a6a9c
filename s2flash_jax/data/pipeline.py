"""grain pipeline: precomputed records -> shuffled, repeated, process-local training batches.

The order of examples is a pure function of (dataset, seed, global batch size):

    source -> decode + validate -> shuffle(seed), reshuffled every epoch, repeated forever
           -> batches of b = global_batch_size / process_count rows
           -> process i keeps batches i, i + P, i + 2P, ...

So global batch k is the concatenation, in process order, of every process's batch k, and it
holds the same rows as batch k of a one-process run with the same global batch size: a
multi-host run sees exactly the data of a single-host run. Only the records a process keeps are
read and decoded (grain's MapDataset is lazy). A position in the stream is therefore one number,
the global batches already taken: `train_batches(start_batch=k)` starts every process at global
batch k, whatever the process count that took the first k. Run checkpoints record it, so a resumed
run continues bit-for-bit, on any number of processes.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from s2flash_jax.data.records import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    SHARD_NAME,
    SHARD_SUFFIX,
    DataError,
    count_records,
    decode_record,
)
from s2flash_jax.storage import resolve

SOURCES = ("arrayrecord", "tfds")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training records come from and how they are read (overridable as `data.<key>=...`).

    source: "arrayrecord" (shards written by `s2flash precompute`) or "tfds" (a TFDS dataset
    prepared in ArrayRecord format, with the record's keys as features).
    path: a directory holding `{split}-NNNNN-of-NNNNN.array_record` shards, a glob of shard
    files, or a single shard; for tfds the local data_dir (empty: TFDS's default data_dir).
    tfds_name: e.g. "my_dataset:1.0.0". split: the shard prefix / TFDS split.
    caption_length: caption tokens per example (L; SANA: 300): shorter captions are padded with
    zeros (mask 0), longer ones are an error (the caller passes it to train_batches).
    num_workers: grain worker processes (0 = read in this process, with threads).
    prefetch_buffer: batches read ahead. drop_caption_text: leave the caption string out of
    batches (the training step does not use it; keep it for logging samples).
    """

    source: str = "arrayrecord"
    path: str = ""
    tfds_name: str = ""
    split: str = "train"
    caption_length: int = 300
    num_workers: int = 0
    prefetch_buffer: int = 2
    drop_caption_text: bool = True

    def __post_init__(self):
        # Only per-key checks: overrides are applied one key at a time, so a check across keys
        # (source=tfds needs tfds_name) would reject a valid sequence of overrides; train_batches
        # makes those.
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {', '.join(SOURCES)}")
        if not self.split:
            raise ValueError("data.split is empty; expected a split name such as 'train'")
        if self.caption_length < 1:
            raise ValueError(f"data.caption_length={self.caption_length} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.prefetch_buffer < 0:
            raise ValueError(f"data.prefetch_buffer={self.prefetch_buffer} must be >= 0")


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What every record must hold for the model being trained."""

    latent_shape: tuple[int, int, int] | None  # [H, W, C]: sample_size x sample_size x in_channels; None: not read
    caption_length: int  # L: captions are padded with zeros up to it
    caption_dim: int  # D: the model's caption_channels
    keep_caption_text: bool = False


# ---------------------------------------------------------------------------------------------
# Public entry points


def train_batches(config: DataConfig, *, global_batch_size: int, seed: int,
                  latent_shape: tuple[int, int, int] | None, caption_length: int, caption_dim: int,
                  process_index: int | None = None, process_count: int | None = None,
                  start_batch: int = 0) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches.

    Yields {"latents": float32 [b, H, W, C], "caption": float32 [b, L, D],
    "caption_mask": int32 [b, L]} (plus "caption_text": str [b] unless config.drop_caption_text),
    b = global_batch_size // process_count; latent_shape None: captions only (a prompts-only
    dataset is then enough). process_index/process_count default to JAX's. start_batch: the
    global batches already taken (a resumed run's position); the first batch yielded is this
    process's rows of global batch start_batch.
    Raises DataError for a missing/empty dataset or a record that does not fit the model
    (the first record is checked here, the others when read).
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    local_batch_size = global_batch_size // process_count
    spec = ExampleSpec(None if latent_shape is None else tuple(latent_shape), caption_length, caption_dim, not config.drop_caption_text)
    source, describe = open_source(config)
    to_example = _ToExample(spec, describe, len(source))
    to_example(0, source[0])  # a mismatched dataset fails now, not at the first step

    dataset = (grain.MapDataset.source(source)
               .map_with_index(to_example)
               .shuffle(seed=seed % 2**32)  # grain takes 32-bit seeds; any run seed maps to one
               .repeat()  # forever; reseeds the shuffle each epoch
               .batch(local_batch_size, drop_remainder=True))
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} must be >= 0")
    dataset = dataset[start_batch * process_count + process_index::process_count]
    read_options = grain.ReadOptions(num_threads=max(1, config.prefetch_buffer),
                                     prefetch_buffer_size=config.prefetch_buffer)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if config.num_workers > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return iter(iter_dataset)


def first_batch(config: DataConfig, count: int, *, seed: int, latent_shape: tuple[int, int, int] | None,
                caption_length: int, caption_dim: int) -> dict[str, np.ndarray]:
    """The first `count` rows of the one-process stream with `seed` (see train_batches): a fixed set
    of examples for checks and previews, the same on every process."""
    stream = train_batches(config, global_batch_size=count, seed=seed, latent_shape=latent_shape,
                           caption_length=caption_length, caption_dim=caption_dim, process_index=0, process_count=1)
    try:
        return next(stream)
    finally:
        stream.close()


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Assemble every process's local batch into global arrays sharded by `sharding`.

    local: this process's rows ({"latents": [b, H, W, C], ...}); sharding: batch axis over the
    mesh's ("data", "fsdp") axes. Global arrays are [P*b, ...]. Text ("caption_text") stays on the host
    and is left out.
    """
    return {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in local.items() if value.dtype.kind not in "USO"}


# ---------------------------------------------------------------------------------------------
# Sources


class _ShardIndex:
    """Names record i of a list of shards, for error messages."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths = list(paths)
        self.starts = np.cumsum([0, *counts]).tolist()

    def __call__(self, index: int) -> str:
        shard = bisect.bisect_right(self.starts, index) - 1
        return f"record {index - self.starts[shard]} of shard {self.paths[shard]}"


class _TfdsIndex:
    def __init__(self, name: str, split: str, data_dir: str):
        self.name, self.split, self.data_dir = name, split, data_dir

    def __call__(self, index: int) -> str:
        return f"record {index} of TFDS dataset {self.name} split {self.split!r} in {self.data_dir}"


def open_source(config: DataConfig):
    """(random-access source, index -> "record i of shard X" describer) for a DataConfig."""
    if config.source == "tfds":
        return _open_tfds(config)
    paths = find_shards(config.path, config.split)
    counts = [count_records(p) for p in paths]
    if sum(counts) == 0:
        raise DataError(f"the shards at data.path={config.path!r} hold no records")
    return grain.sources.ArrayRecordDataSource(paths), _ShardIndex(paths, counts)


def find_shards(path: str, split: str = "train") -> list[str]:
    """The shard files `path` names: a directory (its `{split}-*.array_record`), a glob, or one file;
    local or on object storage (gs://), where ArrayRecord reads them directly.

    A directory with an incomplete set of `-NNNNN-of-NNNNN` shards (an interrupted precompute) is refused.
    """
    if not path:
        raise DataError(f"data.path is empty; expected a directory of {split}-NNNNN-of-NNNNN{SHARD_SUFFIX} "
                        "shards (from `s2flash precompute`), a glob of shard files, or data.source=tfds")
    if glob.has_magic(path):
        paths = _glob(path)
        if not paths:
            raise DataError(f"data.path={path!r} matches no files; expected ArrayRecord shards")
        return paths
    where = resolve(path)
    if where.is_dir():
        paths = sorted(str(p) for p in where.glob(f"{split}-*{SHARD_SUFFIX}"))
        if not paths:
            others = sorted(p.name for p in where.glob(f"*{SHARD_SUFFIX}"))
            found = f" (it holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
            raise DataError(f"data.path={path!r} has no {split}-*{SHARD_SUFFIX} shards{found}; expected the output "
                            "directory of `s2flash precompute`, or set data.split to the shards' prefix")
        _check_shard_set_complete(paths)  # (a glob or a file may name a subset on purpose)
        return paths
    if where.is_file():
        return [str(where)]
    raise DataError(f"data.path={path!r} does not exist; expected a directory of ArrayRecord shards")


def _glob(pattern: str) -> list[str]:
    """The files a glob names, local or on object storage (the pattern's magic in its last parts)."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = resolve("/".join(parts[:fixed]) or ".")
    return sorted(str(p) for p in root.glob("/".join(parts[fixed:])) if p.is_file())


def _check_shard_set_complete(paths: Sequence[str]) -> None:
    groups: dict[tuple[str, int], set[int]] = {}
    for p in paths:
        match = SHARD_NAME.fullmatch(os.path.basename(p))
        if match:
            key = (os.path.join(os.path.dirname(p), match["prefix"]), int(match["count"]))
            groups.setdefault(key, set()).add(int(match["index"]))
    for (stem, count), present in groups.items():
        if present != set(range(count)):
            missing = sorted(set(range(count)) - present)
            raise DataError(f"only {len(present)} of the {count} shards {stem}-*-of-{count:05d}{SHARD_SUFFIX} exist "
                            f"(missing {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                            "an interrupted `s2flash precompute`? finish it with --resume")


def _open_tfds(config: DataConfig):
    if not config.tfds_name:
        raise DataError("data.source=tfds needs data.tfds_name, e.g. data.tfds_name=my_dataset:1.0.0")
    import tensorflow_datasets as tfds  # only tfds users pay its import

    data_dir = config.path or None
    where = f"TFDS dataset {config.tfds_name!r} split {config.split!r} in {data_dir or 'the default data_dir'}"
    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"{where}: data.path={data_dir!r} is not a directory")
    try:
        source = tfds.data_source(config.tfds_name, split=config.split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types (AssertionError, ValueError, DatasetNotFoundError)
        raise DataError(f"cannot open {where} ({type(e).__name__}: {e}); expected a dataset prepared there in "
                        "ArrayRecord file format with features latent, caption_embedding, caption_mask, "
                        "caption") from None
    if len(source) == 0:
        raise DataError(f"{where} has no records")
    return source, _TfdsIndex(config.tfds_name, config.split, data_dir or "the default data_dir")


# ---------------------------------------------------------------------------------------------
# Records -> training examples


class _ToExample:
    """(index, raw record) -> validated training example; a class so grain workers can pickle it."""

    def __init__(self, spec: ExampleSpec, describe, num_records: int):
        self.spec = spec
        self.describe = describe
        self.num_records = num_records

    def __call__(self, index: int, raw: Any) -> dict[str, np.ndarray]:
        # grain's repeat passes the index within the endless stream; the source wraps it.
        where = self.describe(index % self.num_records)
        record = decode_record(raw, where=where) if isinstance(raw, bytes) else _record_from_features(raw, where)
        return example_from_record(record, self.spec, where)


def _record_from_features(features: Any, where: str) -> dict[str, Any]:
    """A TFDS element (dict of numpy arrays, caption as bytes) as a decoded record."""
    if not isinstance(features, dict):
        raise DataError(f"{where}: is a {type(features).__name__}, expected a dict of features")
    missing = [k for k in ("caption_embedding", "caption_mask") if k not in features]
    if missing:
        raise DataError(f"{where}: missing feature(s) {', '.join(missing)}; expected latent, caption_embedding, "
                        "caption_mask, caption")
    record = {key: np.asarray(features[key]) for key in ("latent", "caption_embedding", "caption_mask")
              if key in features}
    for key, allowed in (("latent", FLOAT_DTYPES), ("caption_embedding", FLOAT_DTYPES), ("caption_mask", MASK_DTYPES)):
        if key in record and record[key].dtype.name not in allowed:
            raise DataError(f"{where}: {key} has dtype {record[key].dtype.name}, expected one of {', '.join(allowed)}")
    caption = features.get("caption", b"")
    record["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return record


def example_from_record(record: dict[str, Any], spec: ExampleSpec, where: str = "record") -> dict[str, np.ndarray]:
    """Check a decoded record against the model and pad its caption to spec.caption_length.

    Returns {"latents": float32 [H, W, C], "caption": float32 [L, D], "caption_mask": int32 [L]}
    (+ "caption_text": str); without "latents" when spec.latent_shape is None.
    """
    embedding, mask = record["caption_embedding"], record["caption_mask"]
    latent = record.get("latent")
    if spec.latent_shape is not None and latent is None:
        raise DataError(f"{where}: has no latent (a prompts-only dataset), but this recipe trains on latents "
                        f"{spec.latent_shape}; precompute the images, or use an image-free recipe (tbcm)")
    if latent is not None and spec.latent_shape is not None and latent.shape != spec.latent_shape:
        raise DataError(f"{where}: latent has shape {latent.shape}, expected {spec.latent_shape} "
                        "(the model's sample_size x sample_size x in_channels)")
    if embedding.ndim != 2 or embedding.shape[1] != spec.caption_dim:
        raise DataError(f"{where}: caption_embedding has shape {embedding.shape}, expected "
                        f"(<= {spec.caption_length}, {spec.caption_dim}) (the model's caption_channels)")
    if embedding.shape[0] > spec.caption_length:
        raise DataError(f"{where}: caption_embedding has {embedding.shape[0]} tokens, expected at most "
                        f"{spec.caption_length} (the caption length the data was precomputed for is longer "
                        "than the model's; re-run precompute with --caption-length)")
    if mask.shape != embedding.shape[:1]:
        raise DataError(f"{where}: caption_mask has shape {mask.shape}, expected ({embedding.shape[0]},)")
    n = embedding.shape[0]
    caption = np.zeros((spec.caption_length, spec.caption_dim), np.float32)
    caption[:n] = embedding
    caption_mask = np.zeros((spec.caption_length,), np.int32)
    caption_mask[:n] = mask
    example = {"caption": caption, "caption_mask": caption_mask}
    if spec.latent_shape is not None:
        example["latents"] = latent.astype(np.float32)
        if not np.isfinite(example["latents"]).all():
            raise DataError(f"{where}: latent holds NaN or inf values")
    if spec.keep_caption_text:
        example["caption_text"] = np.asarray(record["caption"])
    return example


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app nothing has parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
