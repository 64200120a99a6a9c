"""Precompute end to end with a tiny random DC-AE and a tiny random Gemma-2 (no downloads)."""

import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from s2flash_jax.data.pipeline import DataConfig, train_batches
from s2flash_jax.data.precompute import (add_precompute_arguments, embed_captions, list_examples, load_image,
                                         precompute, run_precompute)
from s2flash_jax.data.records import DataError, decode_record, read_dataset_info
from s2flash_jax.outputs import OutputExists
from tests.conftest import REPO
from tests.precompute_inputs import (CAPTIONS, HIDDEN, RESOLUTION, save_tiny_encoders,
                                     write_captioned_images)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CAPTION_LENGTH = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(vae folder, text encoder folder) of tiny random models, saved as the real ones are."""
    return save_tiny_encoders(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("images"))


def run(images, out, models, **kwargs):
    vae, text_encoder = models
    settings = dict(vae_path=vae, text_encoder_path=text_encoder, resolution=RESOLUTION,
                    caption_length=CAPTION_LENGTH, batch_size=2, records_per_shard=2, chi_prompt=None, progress=False)
    return precompute(images, out, **{**settings, **kwargs})


def read_shards(out):
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for name in read_dataset_info(out)["shards"]:
        reader = ArrayRecordReader(str(out / name))
        records += [decode_record(raw) for raw in reader.read_all()]
        reader.close()
    return records


def shard_bytes(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name.endswith(".array_record")}


def test_records_are_the_scaled_vae_latents_and_text_encoder_states(images, models, tmp_path):
    from diffusers import AutoencoderDC
    from transformers import AutoModel, AutoTokenizer

    info = run(images, tmp_path / "out", models)
    assert info["num_records"] == 5 and info["num_shards"] == 3
    assert info["latent_shape"] == [8, 8, 4] and info["caption_length"] == CAPTION_LENGTH
    assert info["caption_dim"] == HIDDEN and info["scaling_factor"] == pytest.approx(0.41407)
    assert sorted(os.listdir(tmp_path / "out")) == ["dataset_info.json", "precompute.json",
                                                   *[f"train-0000{i}-of-00003.array_record" for i in range(3)]]
    records = read_shards(tmp_path / "out")
    assert [r["caption"] for r in records] == CAPTIONS

    vae = AutoencoderDC.from_pretrained(models[0]).eval()
    tokenizer, encoder = AutoTokenizer.from_pretrained(models[1]), AutoModel.from_pretrained(models[1]).eval()
    with torch.no_grad():
        for i, record in enumerate(records):
            pixels = torch.from_numpy(load_image(images / f"img{i}.png", RESOLUTION))[None]
            latent = (vae.encode(pixels).latent * vae.config.scaling_factor)[0].permute(1, 2, 0).numpy()
            assert record["latent"].dtype == np.float16
            np.testing.assert_allclose(record["latent"], latent, rtol=2e-3, atol=2e-3)

            tokens = tokenizer(CAPTIONS[i], padding="max_length", max_length=CAPTION_LENGTH, truncation=True,
                               return_tensors="pt")
            hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0].numpy()
            n = int(tokens.attention_mask.sum())  # records stop at the last real token
            assert record["caption_mask"].tolist() == [1] * n
            np.testing.assert_allclose(record["caption_embedding"], hidden[:n], rtol=2e-3, atol=2e-3)

    # What precompute writes, training reads.
    batches = train_batches(DataConfig(path=str(tmp_path / "out")), global_batch_size=5, seed=0,
                            latent_shape=(8, 8, 4), caption_length=CAPTION_LENGTH, caption_dim=HIDDEN,
                            process_index=0, process_count=1)
    batch = next(batches)
    batches.close()
    assert batch["latents"].shape == (5, 8, 8, 4) and batch["caption"].shape == (5, CAPTION_LENGTH, HIDDEN)


def test_jax_backend_writes_the_records_of_the_torch_backend(images, models, tmp_path):
    """The JAX DC-AE and Gemma-2 (read from the same folders, without torch) give the torch backend's
    records: same shards, manifest and dataset_info, floats within 1e-4 relative (float32 storage)."""
    settings = dict(storage_dtype="float32", chi_prompt="describe : user prompt :")  # batches of 2: one padded
    want_info = run(images, tmp_path / "torch", models, **settings)
    got_info = run(images, tmp_path / "jax", models, backend="jax", **settings)
    assert got_info == want_info and got_info["text_encoder_class"] == "Gemma2Model"
    manifests = [json.loads((tmp_path / side / "precompute.json").read_text()) for side in ("torch", "jax")]
    assert manifests[0].pop("backend") == "torch" and manifests[1].pop("backend") == "jax"
    assert manifests[0] == manifests[1]
    for want, got in zip(read_shards(tmp_path / "torch"), read_shards(tmp_path / "jax"), strict=True):
        assert got["caption"] == want["caption"]
        np.testing.assert_array_equal(got["caption_mask"], want["caption_mask"])
        for key in ("latent", "caption_embedding"):
            assert got[key].dtype == want[key].dtype == np.float32 and got[key].shape == want[key].shape
            assert np.abs(got[key] - want[key]).max() <= 1e-4 * np.abs(want[key]).max(), key
    with pytest.raises(DataError, match="--device 'cuda' is for the torch backend"):
        run(images, tmp_path / "other", models, backend="jax", device="cuda")


def test_load_image_center_crops_the_longer_side():
    pixels = np.zeros((16, 48, 3), np.uint8)  # wide: left third black, middle white, right third black
    pixels[:, 16:32] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    buffer.seek(0)
    image = load_image(buffer, 16)
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    np.testing.assert_allclose(image, 1.0, atol=1e-6)  # only the white middle survives the crop


def test_chi_prompt_matches_diffusers_sana_pipeline(models):
    """Token 0 + the last L-1 tokens of chi_prompt + caption, as diffusers' SanaPipeline.encode_prompt."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    tokenizer, encoder = AutoTokenizer.from_pretrained(models[1]), AutoModel.from_pretrained(models[1]).eval()
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=HIDDEN, sample_size=8)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=AutoencoderDC.from_pretrained(models[0]),
                        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    chi = "describe : user prompt :"
    for caption_length in (4, 12):  # long captions are cut, short ones padded
        with torch.no_grad():
            want, want_mask, _, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False,
                                                       max_sequence_length=caption_length,
                                                       complex_human_instruction=[chi])
        got, got_mask = embed_captions(tokenizer, encoder, CAPTIONS, caption_length, chi, "cpu")
        assert got.shape == (len(CAPTIONS), caption_length, HIDDEN)
        np.testing.assert_array_equal(got_mask, want_mask.numpy())
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_resume_after_an_interruption_writes_identical_shards(images, models, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(images, reference, models)

    import s2flash_jax.data.precompute as module

    calls = {"n": 0}
    original = module._BatchEncoder.__call__

    def crash_on_third_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    out = tmp_path / "out"
    monkeypatch.setattr(module._BatchEncoder, "__call__", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(images, out, models)
    monkeypatch.undo()
    # Two whole shards are visible, nothing half-written, and training refuses the incomplete set.
    assert sorted(os.listdir(out)) == ["precompute.json", "train-00000-of-00003.array_record",
                                       "train-00001-of-00003.array_record"]
    with pytest.raises(DataError, match="only 2 of the 3 shards"):
        train_batches(DataConfig(path=str(out)), global_batch_size=1, seed=0, latent_shape=(8, 8, 4),
                      caption_length=CAPTION_LENGTH, caption_dim=HIDDEN, process_index=0, process_count=1)

    (out / ".train-00002-of-00003.array_record.tmp").write_bytes(b"left by a killed process")
    with pytest.raises(OutputExists, match="pass --resume .* or --force"):
        run(images, out, models)
    with pytest.raises(DataError, match="settings differ \\(resolution: was 16, now 32\\)"):
        run(images, out, models, resume=True, resolution=32)
    info = run(images, out, models, resume=True)
    assert shard_bytes(out) == shard_bytes(reference)
    assert info == read_dataset_info(reference)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the stale temporary file is gone

    assert run(images, out, models, resume=True) == info  # nothing left to do
    info = run(images, out, models, force=True, records_per_shard=5)
    assert info["num_shards"] == 1 and sorted(os.listdir(out)) == ["dataset_info.json", "precompute.json",
                                                                   "train-00000-of-00001.array_record"]


def test_metadata_jsonl_and_bad_input_folders(tmp_path, images):
    folder = tmp_path / "meta"
    (folder / "sub").mkdir(parents=True)
    for name in ("img1.png", "img0.png"):
        (folder / "sub" / name).write_bytes((images / name).read_bytes())
    lines = [{"file_name": "sub/img1.png", "text": "second"}, {"file_name": "sub/img0.png", "text": " first "}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert [(e.name, e.caption) for e in list_examples(folder)] == [("sub/img1.png", "second"),
                                                                    ("sub/img0.png", "first")]

    (folder / "metadata.jsonl").write_text('{"file_name": "sub/missing.png", "text": "x"}\n')
    with pytest.raises(DataError, match="line 1: image 'sub/missing.png' does not exist"):
        list_examples(folder)
    (folder / "metadata.jsonl").write_text('{"name": "sub/img0.png"}\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object with file_name and text"):
        list_examples(folder)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "a.jpg").write_bytes((images / "img0.png").read_bytes())
    with pytest.raises(DataError, match="a.jpg has no caption file a.txt"):
        list_examples(lonely)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .png/.jpg/.jpeg/.webp images"):
        list_examples(tmp_path / "empty")
    assert [e.caption for e in list_examples(images)] == CAPTIONS  # notes.md is not an image


def test_command_line_arguments_and_errors(images, models, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_precompute_arguments(parser)
    args = parser.parse_args(["--images", str(images), "--vae", models[0], "--text-encoder", models[1],
                              "--resolution", "15", "--out", str(tmp_path / "out"), "--caption-length", "6",
                              "--no-chi-prompt"])
    assert args.chi_prompt is False and args.batch_size == 8 and args.records_per_shard == 1024
    assert run_precompute(args) == 2
    assert "error: --resolution 15 is not a multiple of the VAE's downsampling factor 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a bad setting
    args.resolution = 16
    assert run_precompute(args) == 0
    assert "5 records in 1 shards" in capsys.readouterr().out
    assert run_precompute(args) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    defaults = parser.parse_args(["--images", "i", "--vae", "v", "--text-encoder", "t", "--resolution", "8",
                                  "--out", "o"])
    assert defaults.chi_prompt is True and defaults.backend == "torch"


def test_core_package_does_not_import_torch():
    code = ("import sys, s2flash_jax.data.pipeline, s2flash_jax.data.precompute; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
