"""Tiny training datasets written by tests (no downloads).

    write_dataset(dir, num_records, ...)       -> dir of train-NNNNN-of-NNNNN.array_record shards
    write_learnable_dataset(dir, num_records)  -> the same, but each latent is its caption's class
                                                  template: a model can fit it in a few steps
    write_tfds_dataset(data_dir, num_records)  -> "name:1.0.0", a TFDS dataset in ArrayRecord format
    make_record(index, ...)                    -> the keyword arguments of encode_record
    record_ids(batch)                          -> the record index of every row of a batch

Record i has latent[..., 0] == i (exact in float16 up to 2048), so tests can tell which records
a batch holds; the other values are random but fixed by (seed, i). Caption i has 1 + i % L real
tokens, so padding is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2flash_jax.data.records import encode_record, write_shards

LATENT_SHAPE = (4, 4, 2)
CAPTION_LENGTH = 8
CAPTION_DIM = 6


def make_record(index: int, *, latent_shape=LATENT_SHAPE, caption_length=CAPTION_LENGTH,
                caption_dim=CAPTION_DIM, seed: int = 0) -> dict:
    """latent_shape None: a prompts-only record."""
    rng = np.random.default_rng([seed, index])
    latent = None
    if latent_shape is not None:
        latent = rng.standard_normal(latent_shape).astype(np.float32)
        latent[..., 0] = index
    tokens = 1 + index % caption_length
    return {
        "latent": latent,
        "caption_embedding": rng.standard_normal((tokens, caption_dim)).astype(np.float32),
        "caption_mask": np.ones((tokens,), np.uint8),
        "caption": f"caption {index}",
    }


def write_dataset(out_dir, num_records: int, *, records_per_shard: int = 8, prefix: str = "train",
                  latent_shape=LATENT_SHAPE, caption_length=CAPTION_LENGTH, caption_dim=CAPTION_DIM,
                  seed: int = 0) -> Path:
    records = (encode_record(**make_record(i, latent_shape=latent_shape, caption_length=caption_length,
                                           caption_dim=caption_dim, seed=seed))
               for i in range(num_records))
    write_shards(records, out_dir, records_per_shard=records_per_shard, prefix=prefix, num_records=num_records,
                 info={"caption_length": caption_length, "vae": "test", "text_encoder": "test"})
    return Path(out_dir)


def write_learnable_dataset(out_dir, num_records: int, *, classes: int = 4, latent_shape=(8, 8, 4),
                            caption_length: int = 8, caption_dim: int = 32, seed: int = 0) -> Path:
    """Record i belongs to class i % classes: its caption is that class's fixed random embedding and
    its latent the class's fixed random template plus 5% noise, so the data has a velocity field a
    tiny model learns quickly (unlike write_dataset's, whose first latent channel is the index)."""
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((classes, *latent_shape)).astype(np.float32)
    captions = rng.standard_normal((classes, caption_length, caption_dim)).astype(np.float32)
    records = (encode_record(latent=templates[i % classes] + 0.05 * rng.standard_normal(latent_shape).astype(np.float32),
                             caption_embedding=captions[i % classes], caption_mask=np.ones(caption_length, np.uint8),
                             caption=f"class {i % classes}")
               for i in range(num_records))
    write_shards(records, out_dir, records_per_shard=num_records, num_records=num_records,
                 info={"caption_length": caption_length, "vae": "test", "text_encoder": "test"})
    return Path(out_dir)


def record_ids(batch: dict) -> list[int]:
    """The record index of each row of a batch (from latents[:, 0, 0, 0])."""
    return [int(v) for v in np.asarray(batch["latents"])[:, 0, 0, 0]]


def write_tfds_dataset(data_dir, num_records: int, *, dataset_name: str = "s2flash_test_records",
                       latent_shape=LATENT_SHAPE, caption_length=CAPTION_LENGTH, caption_dim=CAPTION_DIM) -> str:
    """Prepare a TFDS dataset with the record's features (ArrayRecord file format) in data_dir.

    Returns the name to pass as data.tfds_name. Works without TensorFlow.
    """
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "latent": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float16),
        "caption_embedding": tfds.features.Tensor(shape=(None, caption_dim), dtype=np.float16),
        "caption_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "caption": tfds.features.Text(),
    })

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        # A builder defined outside a package of its own: without this tfds looks for a checksums
        # file beside the module, which needs the optional importlib_resources package.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num_records):
                record = make_record(i, latent_shape=latent_shape, caption_length=caption_length,
                                     caption_dim=caption_dim)
                yield i, {**record, "latent": record["latent"].astype(np.float16),
                          "caption_embedding": record["caption_embedding"].astype(np.float16)}

    builder = Builder(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return f"{dataset_name}:1.0.0"
