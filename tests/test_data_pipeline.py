"""Records, shards and the grain training pipeline, on tiny datasets the tests write."""

import dataclasses
import os

import jax
import msgpack
import numpy as np
import pytest

from s2flash_jax.data.pipeline import DataConfig, global_batch, train_batches
from s2flash_jax.data.records import (DataError, count_records, decode_record, encode_record, read_dataset_info,
                                      write_shards)
from tests.data_helpers import (CAPTION_DIM, CAPTION_LENGTH, LATENT_SHAPE, make_record, record_ids, write_dataset,
                                write_tfds_dataset)

SHAPES = dict(latent_shape=LATENT_SHAPE, caption_length=CAPTION_LENGTH, caption_dim=CAPTION_DIM)


def batches(config, n, *, global_batch_size=4, seed=0, process_index=0, process_count=1, start_batch=0, **shapes):
    iterator = train_batches(config, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                             process_count=process_count, start_batch=start_batch, **{**SHAPES, **shapes})
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """20 records in shards of 6 (the last one short): epochs do not fill whole batches."""
    return write_dataset(tmp_path_factory.mktemp("records"), 20, records_per_shard=6)


# ---------------------------------------------------------------------------------------------
# Records


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_record_round_trip(dtype):
    record = make_record(3)
    decoded = decode_record(encode_record(**record, dtype=dtype))
    assert decoded["caption"] == "caption 3"
    assert decoded["latent"].dtype == np.dtype(dtype) and decoded["latent"].shape == LATENT_SHAPE
    np.testing.assert_array_equal(decoded["latent"], record["latent"].astype(dtype))
    np.testing.assert_array_equal(decoded["caption_embedding"], record["caption_embedding"].astype(dtype))
    np.testing.assert_array_equal(decoded["caption_mask"], record["caption_mask"])


def test_encode_refuses_values_float16_cannot_hold():
    record = make_record(0)
    record["latent"][0, 0, 1] = 1e6
    with pytest.raises(ValueError, match="beyond the float16 range.*float32"):
        encode_record(**record)
    assert decode_record(encode_record(**record, dtype="float32"))["latent"][0, 0, 1] == 1e6


def _packed(**changes):
    obj = msgpack.unpackb(encode_record(**make_record(1)))
    obj.update(changes)
    return msgpack.packb({k: v for k, v in obj.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize("raw, message", [
    (b"\xc1 not msgpack", "not a msgpack-encoded s2flash record"),
    (msgpack.packb([1, 2, 3]), "not an s2flash record"),
    (_packed(version=7), "record version 7, expected 1"),
    (_packed(caption_mask=None), "missing caption_mask"),
    (_packed(latent={"dtype": "int8", "shape": [4, 4, 2], "data": bytes(32)}),
     "latent has dtype 'int8', expected one of float16, bfloat16, float32"),
    (_packed(latent={"dtype": "float16", "shape": [4, 4], "data": bytes(32)}),
     r"latent has shape \[4, 4\], expected a \[H, W, C\]"),
    (_packed(latent={"dtype": "float16", "shape": [4, 4, 2], "data": bytes(10)}), "latent holds 10 bytes, expected 64"),
    (_packed(caption=5), "caption is a int, expected str"),
])
def test_malformed_record_is_one_clear_error(raw, message):
    with pytest.raises(DataError, match=f"^record 9 of shard x: {message}"):
        decode_record(raw, where="record 9 of shard x")


def test_write_shards_names_counts_and_info(tmp_path):
    paths = write_shards([make_record(i) for i in range(7)], tmp_path, records_per_shard=3, prefix="val",
                         info={"vae": "my-vae"})
    assert [p.name for p in paths] == [f"val-0000{i}-of-00003.array_record" for i in range(3)]
    assert [count_records(p) for p in paths] == [3, 3, 1]
    assert sorted(os.listdir(tmp_path)) == ["dataset_info.json"] + [p.name for p in paths]  # no temporary files left
    info = read_dataset_info(tmp_path)
    assert info["num_records"] == 7 and info["num_shards"] == 3 and info["vae"] == "my-vae"
    assert info["latent_shape"] == list(LATENT_SHAPE) and info["latent_dtype"] == "float16"
    assert info["caption_dim"] == CAPTION_DIM


def test_write_shards_leaves_no_partial_shard_when_records_fail(tmp_path):
    def records():
        for i in range(5):
            if i == 4:
                raise RuntimeError("encoder crashed")
            yield make_record(i)

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_shards(records(), tmp_path, records_per_shard=3, num_records=5)
    assert sorted(os.listdir(tmp_path)) == ["train-00000-of-00002.array_record"]


# ---------------------------------------------------------------------------------------------
# Bad datasets


def test_bad_record_in_a_shard_names_shard_and_index(tmp_path):
    records = [encode_record(**make_record(i)) for i in range(8)]
    records[5] = b"garbage"
    write_shards(records, tmp_path / "bad", records_per_shard=4)
    with pytest.raises(DataError, match=r"record 1 of shard .*bad/train-00001-of-00002\.array_record: not a msgpack"):
        batches(DataConfig(path=str(tmp_path / "bad")), 2)


def test_wrong_latent_shape_names_found_and_expected(dataset):
    with pytest.raises(DataError, match=r"record 0 of shard .*train-00000-of-00004\.array_record: latent has shape "
                                        r"\(4, 4, 2\), expected \(8, 8, 4\) \(the model's sample_size"):
        batches(DataConfig(path=str(dataset)), 1, latent_shape=(8, 8, 4))


def test_wrong_caption_dim_and_too_long_captions(dataset):
    with pytest.raises(DataError, match=r"caption_embedding has shape \(1, 6\), expected \(<= 8, 16\)"):
        batches(DataConfig(path=str(dataset)), 1, caption_dim=16)
    # Records hold 1 + i % 8 tokens: a model with caption_length 4 meets a longer one within an epoch.
    with pytest.raises(DataError, match=r"caption_embedding has \d tokens, expected at most 4"):
        batches(DataConfig(path=str(dataset)), 5, caption_length=4)


def test_not_an_array_record_file(tmp_path):
    (tmp_path / "train-00000-of-00001.array_record").write_bytes(b"not an array record" * 10)
    with pytest.raises(DataError, match=r"train-00000-of-00001\.array_record is not an ArrayRecord file"):
        batches(DataConfig(path=str(tmp_path)), 1)


@pytest.mark.parametrize("setup, path, message", [
    (lambda d: None, "", "data.path is empty"),
    (lambda d: None, "{d}/nowhere", "does not exist"),
    (lambda d: None, "{d}", "has no train-\\*.array_record shards"),
    (lambda d: write_dataset(d, 4, prefix="val"), "{d}",
     "has no train-.* \\(it holds val-00000-of-00001.array_record\\)"),
    (lambda d: None, "{d}/*.array_record", "matches no files"),
    (lambda d: (write_dataset(d, 9, records_per_shard=3), (d / "train-00001-of-00003.array_record").unlink()), "{d}",
     "only 2 of the 3 shards .*missing 1.*--resume"),
])
def test_missing_or_empty_dataset(tmp_path, setup, path, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        batches(DataConfig(path=path.format(d=tmp_path)), 1)


def test_a_glob_may_name_a_subset_of_shards(dataset):
    ids = sum((record_ids(b) for b in batches(DataConfig(path=f"{dataset}/train-0000[0-1]-*.array_record"), 6)), [])
    assert set(ids) == set(range(12))  # shards 0 and 1 hold records 0..11


def test_data_config_errors_name_the_key():
    for changes, message in [({"source": "webdataset"}, "data.source='webdataset' must be one of"),
                             ({"num_workers": -1}, "data.num_workers=-1"),
                             ({"caption_length": 0}, "data.caption_length=0 must be >= 1"),
                             ({"prefetch_buffer": -2}, "data.prefetch_buffer"),
                             ({"split": ""}, "data.split is empty")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(DataConfig(), **changes)
    with pytest.raises(DataError, match="data.tfds_name"):
        batches(DataConfig(source="tfds"), 1)


def test_batch_size_must_divide_over_processes(dataset):
    with pytest.raises(ValueError, match="global batch size 6 must be a positive multiple of the process count 4"):
        batches(DataConfig(path=str(dataset)), 1, global_batch_size=6, process_count=4)


# ---------------------------------------------------------------------------------------------
# Order: determinism, epochs, processes, resume


def test_batches_have_the_documented_shapes_and_padding(dataset):
    batch = batches(DataConfig(path=str(dataset), drop_caption_text=False), 1)[0]
    assert batch["latents"].shape == (4, *LATENT_SHAPE) and batch["latents"].dtype == np.float32
    assert batch["caption"].shape == (4, CAPTION_LENGTH, CAPTION_DIM) and batch["caption"].dtype == np.float32
    assert batch["caption_mask"].shape == (4, CAPTION_LENGTH) and batch["caption_mask"].dtype == np.int32
    for row, index in enumerate(record_ids(batch)):
        record = make_record(index)
        tokens = len(record["caption_mask"])
        assert batch["caption_text"][row] == f"caption {index}"
        np.testing.assert_array_equal(batch["latents"][row], record["latent"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(batch["caption"][row, :tokens], record["caption_embedding"].astype(np.float16))
        assert not batch["caption"][row, tokens:].any()
        assert batch["caption_mask"][row].tolist() == [1] * tokens + [0] * (CAPTION_LENGTH - tokens)
    assert "caption_text" not in batches(DataConfig(path=str(dataset)), 1)[0]


def test_same_seed_same_batches_other_seed_other_order(dataset):
    config = DataConfig(path=str(dataset))
    first = [record_ids(b) for b in batches(config, 10, seed=1)]
    assert first == [record_ids(b) for b in batches(config, 10, seed=1)]
    assert first != [record_ids(b) for b in batches(config, 10, seed=2)]


def test_every_epoch_is_a_new_permutation(dataset):
    ids = sum((record_ids(b) for b in batches(DataConfig(path=str(dataset)), 15)), [])  # 3 epochs of 20
    epochs = [ids[0:20], ids[20:40], ids[40:60]]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_together_read_the_one_process_batches(dataset, process_count):
    local = 3
    single = batches(DataConfig(path=str(dataset)), 12, global_batch_size=local * process_count)
    per_process = [batches(DataConfig(path=str(dataset)), 12, global_batch_size=local * process_count,
                           process_index=i, process_count=process_count) for i in range(process_count)]
    for step, whole in enumerate(single):
        for key in whole:
            assert per_process[0][step][key].shape[0] == local
            joined = np.concatenate([p[step][key] for p in per_process])
            np.testing.assert_array_equal(joined, whole[key])


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, id="worker-processes")])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_a_stream_started_at_a_global_batch_continues_any_process_counts_stream(dataset, num_workers, process_count):
    """A run that took 7 global batches (across epochs: 28 of 20 records) resumes at batch 7 on any
    number of processes, and together they read what the one-process stream reads from there."""
    reference = batches(DataConfig(path=str(dataset)), 12, seed=5, global_batch_size=4)  # in-process, one process
    config = DataConfig(path=str(dataset), num_workers=num_workers)
    local = 4 // process_count
    resumed = [batches(config, 5, seed=5, global_batch_size=4, process_index=i, process_count=process_count,
                       start_batch=7) for i in range(process_count)]
    for step, want in enumerate(reference[7:]):
        for key in want:
            assert resumed[0][step][key].shape[0] == local
            np.testing.assert_array_equal(np.concatenate([r[step][key] for r in resumed]), want[key])


def test_global_batch_builds_sharded_arrays(dataset):
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    local = batches(DataConfig(path=str(dataset), drop_caption_text=False), 1)[0]
    arrays = global_batch(local, sharding)
    assert sorted(arrays) == ["caption", "caption_mask", "latents"]
    for key, array in arrays.items():
        assert array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array), local[key])


# ---------------------------------------------------------------------------------------------
# TFDS


def test_tfds_dataset_reads_like_array_record_shards(tmp_path):
    name = write_tfds_dataset(tmp_path, 10)
    config = DataConfig(source="tfds", tfds_name=name, path=str(tmp_path), drop_caption_text=False)
    got = batches(config, 4, global_batch_size=5)
    assert got[0]["latents"].shape == (5, *LATENT_SHAPE) and got[0]["caption"].shape == (5, CAPTION_LENGTH, CAPTION_DIM)
    ids = sum((record_ids(b) for b in got), [])
    assert sorted(ids[:10]) == sorted(ids[10:]) == list(range(10))
    for batch in got:
        for row, index in enumerate(record_ids(batch)):
            assert batch["caption_text"][row] == f"caption {index}"
            assert batch["caption_mask"][row].sum() == 1 + index % CAPTION_LENGTH
    assert [record_ids(b) for b in batches(config, 4, global_batch_size=5)] == [record_ids(b) for b in got]
    with pytest.raises(DataError, match=r"record \d+ of TFDS dataset .*: latent has shape \(4, 4, 2\), "
                                        r"expected \(2, 2, 2\)"):
        batches(config, 1, latent_shape=(2, 2, 2))
    with pytest.raises(DataError, match="cannot open TFDS dataset 'no_such_dataset:1.0.0'"):
        batches(dataclasses.replace(config, tfds_name="no_such_dataset:1.0.0"), 1)
