"""Bad input to `s2flash convert`: exit code 2, one line naming the problem, nothing at the output path."""

import dataclasses
import json
import sys

import pytest
import torch
from flax import nnx

from s2flash_jax.cli import build_parser
from s2flash_jax.model_checkpoint import save_model
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from tests.convert_fixtures import CONFIGS, convert, random_transformer, save_transformer, write_config, write_original
from tests.sana_reference import BASE


def refused(capsys, tmp_path, *args, out="out") -> str:
    """Run the command, check it failed cleanly, and return its one-line message."""
    code, stdout, err = convert(capsys, *args)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2flash convert: error: "), err
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(f".{out}.partial-*"))  # no half-written staging directory either
    return lines[0]


@pytest.fixture
def diffusers_folder(tmp_path):
    return save_transformer(random_transformer(CONFIGS["sprint_student"]), tmp_path / "src")


def test_truncated_safetensors(diffusers_folder, tmp_path, capsys):
    weights = diffusers_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = refused(capsys, tmp_path, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "out")
    assert f"{weights} is not a complete safetensors file" in message and "truncated" in message

    weights.write_bytes(b"\x10\x00")  # not even a header
    assert "less than the 8-byte header length" in refused(
        capsys, tmp_path, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "out")


def test_truncated_torch_checkpoint(tmp_path, capsys):
    model = random_transformer(CONFIGS["sprint_student"])
    src = write_original(model, tmp_path / "ckpt.pth")
    src.write_bytes(src.read_bytes()[:5000])
    message = refused(capsys, tmp_path, "import", "--format", "sana", src, "--out", tmp_path / "out")
    assert f"{src} cannot be read as a PyTorch checkpoint" in message


def test_checkpoints_of_other_architectures(tmp_path, capsys):
    from diffusers import AutoencoderDC

    AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                  decoder_block_types="ResBlock", encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                  encoder_layers_per_block=(1,), decoder_layers_per_block=(1,), encoder_qkv_multiscales=((),),
                  decoder_qkv_multiscales=((),)).save_pretrained(tmp_path / "vae")
    assert "is the config of a AutoencoderDC, not of a SanaTransformer2DModel" in refused(
        capsys, tmp_path, "import", "--format", "diffusers", tmp_path / "vae", "--out", tmp_path / "out")

    # A PixArt-style block (MLP instead of SANA's GLUMBConv) in original SANA naming.
    model = random_transformer(CONFIGS["sprint_student"])
    state = {k.replace("mlp.inverted_conv.conv", "mlp.fc1").replace("mlp.point_conv.conv", "mlp.fc2"): v
             for k, v in torch.load(write_original(model, tmp_path / "a.pth"), weights_only=True)["state_dict"].items()}
    torch.save({"state_dict": state}, tmp_path / "pixart.pth")
    assert "not an original SANA checkpoint: it lacks blocks.0.mlp.point_conv.conv.weight" in refused(
        capsys, tmp_path, "import", "--format", "sana", tmp_path / "pixart.pth", "--out", tmp_path / "out")


def test_a_config_that_does_not_fit_its_weights(diffusers_folder, tmp_path, capsys):
    config = json.loads((diffusers_folder / "config.json").read_text())
    (diffusers_folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    message = refused(capsys, tmp_path, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "out")
    assert "does not fit the model: 23 missing keys (transformer_blocks.2.scale_shift_table: expected (6, 32)" in message


def test_wrong_format(diffusers_folder, tmp_path, capsys):
    assert ("--format sana expects an original NVlabs SANA checkpoint file but "
            f"{diffusers_folder} is a diffusers transformer folder; use --format diffusers") in refused(
        capsys, tmp_path, "import", "--format", "sana", diffusers_folder, "--out", tmp_path / "out")
    pth = write_original(random_transformer(CONFIGS["sprint_student"]), tmp_path / "ckpt.pth")
    assert "--format diffusers expects a diffusers transformer folder but" in refused(
        capsys, tmp_path, "import", "--format", "diffusers", pth, "--out", tmp_path / "out")
    convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "ckpt")
    assert "is an s2flash model checkpoint (already converted)" in refused(
        capsys, tmp_path, "import", "--format", "diffusers", tmp_path / "ckpt", "--out", tmp_path / "out")
    with pytest.raises(SystemExit) as info:  # not a format at all: argparse's usage error
        build_parser().parse_args(["convert", "import", "--format", "flux", str(pth), "--out", "x"])
    assert info.value.code == 2
    assert "invalid choice: 'flux'" in capsys.readouterr().err


def test_existing_output_is_refused_then_replaced_with_force(diffusers_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, _, err = convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "out")
    assert code == 2 and "already exists and is not empty; pass --force" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    code, _, _ = convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "out", "--force")
    assert code == 0 and (tmp_path / "out" / "model.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()


def test_a_failed_forced_conversion_keeps_the_old_output(diffusers_folder, tmp_path, capsys):
    convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    weights = diffusers_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    code, _, _ = convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "ckpt", "--force")
    assert code == 2 and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_missing_torch_extra_is_named(tmp_path, capsys, monkeypatch):
    model = random_transformer(CONFIGS["sprint_student"])
    pth, config = write_original(model, tmp_path / "ckpt.pth"), write_config(model, tmp_path / "config.json")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    message = refused(capsys, tmp_path, "import", "--format", "sana", pth, "--out", tmp_path / "out", "--config", config)
    assert "convert import needs the [torch] extra (module 'torch' is not installed)" in message


def fake_pipeline(path, *, text_width, latent_channels):
    """A pipeline folder as far as export reads it: model_index.json and the component configs."""
    for name, config in (("vae", {"latent_channels": latent_channels}), ("text_encoder", {"hidden_size": text_width}),
                         ("tokenizer", {})):
        (path / name).mkdir(parents=True)
        (path / name / "config.json").write_text(json.dumps(config))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "SanaPipeline", "vae": ["diffusers", "AutoencoderDC"],
        "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizerFast"]}))
    return path


def test_pipeline_export_needs_a_complete_pipeline_that_fits(diffusers_folder, tmp_path, capsys):
    teacher = save_transformer(random_transformer(CONFIGS["sprint_teacher"]), tmp_path / "teacher")
    convert(capsys, "import", "--format", "diffusers", teacher, "--out", tmp_path / "flow_ckpt")
    convert(capsys, "import", "--format", "diffusers", diffusers_folder, "--out", tmp_path / "student_ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    narrow = fake_pipeline(tmp_path / "narrow", text_width=16, latent_channels=4)  # the models read 24-wide captions
    deep = fake_pipeline(tmp_path / "deep", text_width=24, latent_channels=32)  # the models take 4 channels
    for ckpt in ("flow_ckpt", "student_ckpt"):  # a SanaPipeline and a SanaSprintPipeline export alike
        export = ("export", tmp_path / ckpt, "--out", tmp_path / "out", "--pipeline")
        assert f"--pipeline {tmp_path / 'empty'} lacks vae, text_encoder, tokenizer" in refused(
            capsys, tmp_path, *export, tmp_path / "empty")
        assert "its text encoder is 16 wide but the transformer reads captions of caption_channels=24" in refused(
            capsys, tmp_path, *export, narrow)
        assert "its VAE has 32 latent channels but the transformer takes in_channels=4" in refused(
            capsys, tmp_path, *export, deep)

    meta = tmp_path / "flow_ckpt" / "model.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sampling": {"flow_shift": -3}}))
    assert f"{meta}: sampling.flow_shift -3 is not a positive number" in refused(
        capsys, tmp_path, "export", tmp_path / "flow_ckpt", "--out", tmp_path / "out", "--pipeline",
        fake_pipeline(tmp_path / "fits", text_width=24, latent_channels=4))


def test_a_twinflow_student_is_not_exported(tmp_path, capsys):
    config = dataclasses.replace(SanaConfig.from_diffusers({**BASE, **CONFIGS["sprint_teacher"]}), twinflow_embeds=True)
    save_model(tmp_path / "twin_ckpt", config, nnx.state(SanaTransformer(config, rngs=nnx.Rngs(0)), nnx.Param))
    pipeline = fake_pipeline(tmp_path / "pipe", text_width=config.caption_channels, latent_channels=config.in_channels)
    for extra in ((), ("--pipeline", pipeline)):
        assert f"{tmp_path / 'twin_ckpt'} is a TwinFlow student (twinflow_embeds=True)" in refused(
            capsys, tmp_path, "export", tmp_path / "twin_ckpt", "--out", tmp_path / "out", *extra)


def test_import_help_names_every_preset(capsys, monkeypatch):
    from conversion.sana_original import PRESETS

    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside the names
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "import", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in PRESETS)
