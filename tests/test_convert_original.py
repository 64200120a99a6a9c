"""Original NVlabs SANA checkpoints (fused qkv / kv, original names) import to the same parameters
as the equivalent diffusers checkpoint; what diffusers drops is kept; the architecture is inferred."""

import numpy as np
import pytest
import torch

from conversion.errors import ConversionError
from conversion.importer import original_plan
from conversion.inspection import inspect_checkpoint
from conversion.safetensors_io import TensorSpec
from conversion.sana_original import PRESETS, infer_config, original_state_dict
from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import read_metadata, read_model_config, read_stored_params, stored_params
from s2flash_jax.models.sana import SanaConfig
from tests.conftest import REPO
from tests.convert_fixtures import (CONFIGS, convert, oracle_original, random_transformer, save_transformer,
                                    write_config, write_original)


def test_the_key_table_inverts_to_the_convert_scripts_mapping():
    model = random_transformer(CONFIGS["sprint_student"])
    config = SanaConfig.from_diffusers(dict(model.config))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    oracle = oracle_original(model.state_dict(), config.num_layers, guidance=True)
    ours = original_state_dict(sd, config)
    assert ours.keys() == oracle.keys()
    for key, value in oracle.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,file", [("sprint_student", "ckpt.pth"), ("sprint_teacher", "ckpt.pth"),
                                       ("bias_affine_channels", "ckpt.safetensors")])
def test_original_and_diffusers_imports_give_identical_parameters(name, file, dtype, tmp_path, capsys):
    model = random_transformer(CONFIGS[name], dtype)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    null_caption = torch.randn(7, model.config.caption_channels).to(dtype)
    logvar = {"logvar_linear.weight": torch.randn(1, width).to(dtype), "logvar_linear.bias": torch.randn(1).to(dtype)}
    extras = {"y_embedder.y_embedding": null_caption, **logvar}
    if model.config.interpolation_scale is None:
        extras["pos_embed"] = torch.zeros(1, 64, width)  # SANA registers it even when unused
    src = write_original(model, tmp_path / file, extras=extras, safetensors=file.endswith(".safetensors"))

    code, out, err = convert(capsys, "import", "--format", "sana", src, "--out", tmp_path / "from_sana",
                             "--config", write_config(model, tmp_path / "config.json"))
    assert code == 0, err
    assert "kept (diffusers drops it): y_embedder.y_embedding" in out and "logvar_linear" in out
    assert convert(capsys, "import", "--format", "diffusers", save_transformer(model, tmp_path / "diffusers"),
                   "--out", tmp_path / "from_diffusers")[0] == 0

    from_sana, from_diffusers = tmp_path / "from_sana", tmp_path / "from_diffusers"
    assert read_model_config(from_sana) == SanaConfig.from_diffusers(dict(model.config), logvar_head=True)
    names = sorted(stored_params(from_diffusers))
    assert sorted(stored_params(from_sana)) == sorted(names + ["logvar_linear/bias", "logvar_linear/kernel"])
    a, b = read_stored_params(from_sana, names), read_stored_params(from_diffusers, names)
    for key in names:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    kept = read_stored_params(from_sana, ["logvar_linear/kernel", "logvar_linear/bias"])
    np.testing.assert_array_equal(kept["logvar_linear/kernel"].astype(np.float32), logvar["logvar_linear.weight"].float().numpy().T)
    np.testing.assert_array_equal(kept["logvar_linear/bias"].astype(np.float32), logvar["logvar_linear.bias"].float().numpy())
    assert read_metadata(from_sana)["null_caption"] == "null_caption.npy"
    np.testing.assert_array_equal(np.load(from_sana / "null_caption.npy"), null_caption.float().numpy())


def _specs(config: SanaConfig) -> dict[str, TensorSpec]:
    """The tensor shapes of an original checkpoint of this architecture (no data)."""
    return {key: TensorSpec(shape, np.dtype(np.float32)) for key, shape in original_plan(config).expected.items()}


@pytest.mark.parametrize("preset", ["sana-sprint-0.6b", "sana-sprint-1.6b"])
def test_a_sprint_students_architecture_is_read_from_its_shapes(preset):
    expected = SanaConfig.from_diffusers(PRESETS[preset], logvar_head=True)
    config, origin = infer_config(_specs(expected), None)
    assert config == expected and origin == f"preset {preset}"


def test_what_shapes_cannot_tell_needs_a_config():
    teacher = SanaConfig.from_diffusers(PRESETS["sana-sprint-1.6b-teacher"])
    with pytest.raises(ConversionError, match="does not record its time-embedding scale .* pass --config "
                                              "sana-sprint-1.6b-teacher or a diffusers config.json"):
        infer_config(_specs(teacher), None)
    assert infer_config(_specs(teacher), PRESETS["sana-sprint-1.6b-teacher"])[0] == teacher

    odd = SanaConfig.from_diffusers({**PRESETS["sana-sprint-0.6b"], "num_attention_heads": 30, "cross_attention_dim": 960,
                                     "num_cross_attention_heads": 10, "cross_attention_head_dim": 96})
    with pytest.raises(ConversionError, match="cannot tell the head split.* of a 960-wide, 28-block checkpoint"):
        infer_config(_specs(odd), None)
    with pytest.raises(ConversionError, match="does not fit --config: num_layers=28 in the checkpoint, 20 in --config"):
        infer_config(_specs(odd), {**odd.to_diffusers(), "num_layers": 20})


def test_presets_are_the_project_configs():
    for size in ("0.6b", "1.6b"):
        config = load_config(f"{REPO}/configs/sana_sprint.py:{size}", [])
        assert config.model.to_diffusers() == SanaConfig.from_diffusers(PRESETS[f"sana-sprint-{size}"]).to_diffusers()
        assert config.teacher.to_diffusers() == SanaConfig.from_diffusers(
            PRESETS[f"sana-sprint-{size}-teacher"]).to_diffusers()


def test_a_used_position_embedding_needs_its_interpolation_scale(tmp_path, capsys):
    model = random_transformer(CONFIGS["sprint_student"])
    src = write_original(model, tmp_path / "ckpt.pth", extras={"pos_embed": torch.randn(1, 64, 32)})
    code, _, err = convert(capsys, "import", "--format", "sana", src, "--out", tmp_path / "out",
                           "--config", write_config(model, tmp_path / "config.json"))
    assert code == 2 and "pos_embed is non-zero but the config has interpolation_scale=None" in err
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_keys_it_does_not_understand(tmp_path, capsys):
    model = random_transformer(CONFIGS["sprint_student"])
    src = write_original(model, tmp_path / "ckpt.pth", extras={"blocks.0.attn.extra_gate": torch.zeros(3)})
    report = inspect_checkpoint(src, "sana", str(write_config(model, tmp_path / "config.json"))).report()
    assert "format: sana (original NVlabs SANA checkpoint, torch file, other entries: epoch, optimizer)" in report
    assert "  guidance_embeds = True" in report
    n = sum(p.numel() for p in model.parameters()) + 3
    assert f"parameters: {n:,} in " in report and "torch.float32" not in report and "float32: " in report
    assert "unexpected keys (1):\n    blocks.0.attn.extra_gate: found (3,)" in report
