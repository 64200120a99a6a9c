"""diffusers -> s2flash -> diffusers is bit-identical, loads strictly in diffusers, and streams."""

import json

import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel
from flax import nnx

import conversion.exporter
import conversion.safetensors_io
from conversion.sana_diffusers import sana_from_diffusers
from s2flash_jax.model_checkpoint import load_params, read_model_config, stored_params
from s2flash_jax.models.params import flat_params
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.precision import FP32
from tests.convert_fixtures import CONFIGS, convert, folder_tensors, random_transformer, same_bits, save_transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_round_trip_is_bit_identical(name, dtype, tmp_path, capsys):
    model = random_transformer(CONFIGS[name], DTYPES[dtype])
    # One source sharded (with an index), the others single-file.
    src = save_transformer(model, tmp_path / "src", max_shard_size="40KB" if name == "sprint_student" else None)
    assert convert(capsys, "import", "--format", "diffusers", src, "--out", tmp_path / "ckpt")[0] == 0
    assert {str(s.dtype) for s in stored_params(tmp_path / "ckpt").values()} == {str(DTYPES[dtype]).split(".")[1]}
    assert read_model_config(tmp_path / "ckpt").to_diffusers() == {
        k: v for k, v in model.config.items() if not k.startswith("_")}  # every key carried over

    code, out, _ = convert(capsys, "export", tmp_path / "ckpt", "--out", tmp_path / "out", "--max-shard-size", "50KB")
    assert code == 0 and "safetensors files" in out  # sharded: several files and an index
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    original, exported = folder_tensors(src), folder_tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert same_bits(exported[key], value), key

    loaded, info = SanaTransformer2DModel.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                         torch_dtype=DTYPES[dtype])
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)


@pytest.mark.parametrize("name", ["sprint_student", "bias_affine_channels"])
def test_imported_checkpoint_holds_what_the_in_memory_loader_builds(name, tmp_path, capsys):
    """The streamed import and `sana_from_diffusers` (tested against diffusers' forward pass) agree."""
    model = random_transformer(CONFIGS[name], torch.bfloat16)
    convert(capsys, "import", "--format", "diffusers", save_transformer(model, tmp_path / "src"), "--out", tmp_path / "ckpt")
    reference = sana_from_diffusers(model.config, model.state_dict(), precision=FP32)
    config = read_model_config(tmp_path / "ckpt")
    abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))))
    restored = load_params(tmp_path / "ckpt", config, abstract)  # as train.teacher_checkpoint reads it
    expected = flat_params(reference)
    got = {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(restored)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)


def test_each_tensor_is_read_once_and_each_parameter_exported_alone(tmp_path, capsys, monkeypatch):
    model = random_transformer(CONFIGS["sprint_student"])
    src = save_transformer(model, tmp_path / "src")
    reads, params_read = [], []
    original_read = conversion.safetensors_io.SafetensorsFile.read
    monkeypatch.setattr(conversion.safetensors_io.SafetensorsFile, "read",
                        lambda self, name: reads.append(name) or original_read(self, name))
    convert(capsys, "import", "--format", "diffusers", src, "--out", tmp_path / "ckpt")
    assert sorted(reads) == sorted(model.state_dict())

    original_params = conversion.exporter.read_stored_params
    monkeypatch.setattr(conversion.exporter, "read_stored_params",
                        lambda ckpt, names: params_read.append(list(names)) or original_params(ckpt, names))
    monkeypatch.setattr(conversion.exporter._ParamStream, "GROUP_BYTES", 4096)  # several groups for a tiny model
    convert(capsys, "export", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert len(params_read) > 3
    assert sorted(sum(params_read, [])) == sorted(stored_params(tmp_path / "ckpt"))  # each parameter once
    stored = stored_params(tmp_path / "ckpt")
    for group in params_read:  # a group is one parameter, or several within the budget
        assert len(group) == 1 or sum(np.prod(stored[p].shape) * stored[p].dtype.itemsize for p in group) <= 4096


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_export_dtype_casts_like_torch(dtype, tmp_path, capsys):
    model = random_transformer(CONFIGS["sprint_teacher"])
    convert(capsys, "import", "--format", "diffusers", save_transformer(model, tmp_path / "src"), "--out", tmp_path / "ckpt")
    assert convert(capsys, "export", tmp_path / "ckpt", "--out", tmp_path / "out", "--dtype", dtype)[0] == 0
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    exported = folder_tensors(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert same_bits(exported[key], value.to(torch_dtype)), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "SanaTransformer2DModel"


def test_export_refuses_a_dtype_that_overflows(tmp_path, capsys):
    model = random_transformer(CONFIGS["sprint_teacher"])
    with torch.no_grad():
        model.proj_out.weight[0, 0] = 1e6  # beyond float16's 65504
    convert(capsys, "import", "--format", "diffusers", save_transformer(model, tmp_path / "src"), "--out", tmp_path / "ckpt")
    code, _, err = convert(capsys, "export", tmp_path / "ckpt", "--out", tmp_path / "out", "--dtype", "fp16")
    assert code == 2 and "proj_out/kernel has values beyond the range of float16" in err
    assert not (tmp_path / "out").exists()


def test_inspect_reports_format_config_count_and_dtypes(tmp_path, capsys):
    model = random_transformer(CONFIGS["posembed_patch2"], torch.bfloat16)
    src = save_transformer(model, tmp_path / "src")
    n = sum(p.numel() for p in model.parameters())
    code, report, _ = convert(capsys, "inspect", src)
    assert code == 0
    assert "format: diffusers (diffusers transformer folder, 1 safetensors file)" in report
    assert "config (from config.json):" in report and "  patch_size = 2" in report
    assert f"  bfloat16: {n:,} parameters in {len(model.state_dict())} tensors" in report
    assert "keys: all understood" in report

    convert(capsys, "import", "--format", "diffusers", src, "--out", tmp_path / "ckpt")
    code, report, _ = convert(capsys, "inspect", tmp_path / "ckpt")
    assert "format: s2flash (s2flash model checkpoint)" in report and f"parameters: {n:,} in " in report
    assert f"converted from: diffusers {src}" in report and "keys: all understood" in report
