"""The JAX DC-AE against diffusers' AutoencoderDC on tiny random configs, and its import from diffusers folders."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from conversion.dc_ae import (dc_ae_config_from_diffusers, dc_ae_from_source, dc_ae_state_dict, expected_torch_shapes,
                              load_dc_ae)
from conversion.errors import ConversionError
from conversion.sources import TorchStateDict
from s2flash_jax.models.dc_ae import SANA_F32C32, DCAEConfig
from s2flash_jax.precision import FP32

# The vae/config.json of Efficient-Large-Model/Sana_1600M_1024px_diffusers (and mit-han-lab/dc-ae-f32c32-sana-1.x).
SANA_VAE_CONFIG = {
    "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv", "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu", "encoder_out_shortcut": True, "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu", "scaling_factor": 0.41407,
}

# name -> (AutoencoderDC kwargs, image (H, W))
CASES = {
    # SANA's f32c32 options at tiny widths: strided-conv down, nearest-interpolate up, 5x5 multiscale
    # linear attention in the last stage, 3 stages (f = 4).
    "sana_like": (dict(
        latent_channels=8, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 1, 2),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        downsample_block_type="Conv", upsample_block_type="interpolate", decoder_conv_act_fn="relu",
        scaling_factor=0.41407), (16, 24)),
    # The other options: pixel (un)shuffle, an empty first stage (conv_in / conv_out are resampling
    # blocks), two attention scales, per-stage activations, no encoder shortcut, widths that are not a
    # multiple of the head size, and 4x4 = 16 tokens <= head_dim where diffusers switches to its
    # quadratic attention form.
    "pixel_shuffle_empty_first_stage": (dict(
        latent_channels=4, attention_head_dim=16,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 24, 48), decoder_block_out_channels=(16, 16, 32),
        encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 2, 1),
        encoder_qkv_multiscales=((), (3, 5), ()), decoder_qkv_multiscales=((), (), (3,)),
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
        decoder_act_fns=("relu", "gelu", "silu"), decoder_conv_act_fn="silu", encoder_out_shortcut=False), (16, 16)),
}


@pytest.fixture(scope="module")
def autoencoder_dc():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers").AutoencoderDC


def random_reference(autoencoder_dc, case: str, seed: int = 0):
    """A diffusers AutoencoderDC whose every parameter is random (no ones / zeros left from init)."""
    import torch

    torch.manual_seed(seed)
    model = autoencoder_dc(**CASES[case][0]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_and_decode_match_diffusers(autoencoder_dc, case):
    import torch

    reference = random_reference(autoencoder_dc, case)
    model = dc_ae_from_source(dc_ae_config_from_diffusers(reference.config), TorchStateDict(reference.state_dict()),
                              FP32)
    height, width = CASES[case][1]
    images = np.random.default_rng(1).uniform(0, 1, (2, height, width, 3)).astype(np.float32)
    with torch.no_grad():  # diffusers works on NCHW pixels in [-1, 1]
        latents = reference.encode(torch.from_numpy(2 * images - 1).permute(0, 3, 1, 2)).latent
        pixels = reference.decode(latents).sample.permute(0, 2, 3, 1).numpy()
    latents = latents.permute(0, 2, 3, 1).numpy()

    got_latents, got_pixels, got_images = nnx.jit(lambda m, x, z: (m.encode(x), m.decoder(z), m.decode(z)))(
        model, images, latents)
    assert relative_error(np.asarray(got_latents), latents) <= 1e-4
    assert relative_error(np.asarray(got_pixels), pixels) <= 1e-4
    np.testing.assert_allclose(np.asarray(got_images), np.clip((pixels + 1) / 2, 0, 1), atol=1e-4)


@pytest.fixture(scope="module")
def saved(autoencoder_dc, tmp_path_factory):
    """The sana_like reference saved by diffusers: single fp32, sharded bf16, and as a pipeline's vae/."""
    import torch

    reference = random_reference(autoencoder_dc, "sana_like")
    root = tmp_path_factory.mktemp("dc_ae")
    reference.save_pretrained(root / "single")
    reference.save_pretrained(root / "pipeline" / "vae")
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.to(torch.bfloat16).save_pretrained(root / "sharded", max_shard_size="20KB")  # .to() is in place
    return root, reference.config, state_dict


@pytest.mark.parametrize("layout", ["single", "sharded", "pipeline"])
def test_load_dc_ae_reads_diffusers_folders(saved, autoencoder_dc, layout):
    import torch

    root, config, state_dict = saved
    if layout == "sharded":
        assert len(list((root / layout).glob("*.safetensors"))) > 1
    model = load_dc_ae(root / layout, FP32)
    assert model.config == dc_ae_config_from_diffusers(config)
    dtype = torch.bfloat16 if layout == "sharded" else torch.float32
    expected = {k: v.to(dtype).float() for k, v in state_dict.items()}
    exported = dc_ae_state_dict(model)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # The reverse table gives a state dict diffusers loads strictly.
    reloaded = {k: torch.from_numpy(v.copy()) for k, v in exported.items()}
    autoencoder_dc(**CASES["sana_like"][0]).load_state_dict(reloaded, strict=True)


def _drop_tensor(tensors, config):
    del tensors["decoder.up_blocks.2.1.attn.to_qkv_multiscale.0.proj_out.weight"]


def _add_tensor(tensors, config):
    tensors["encoder.down_blocks.0.9.conv1.weight"] = tensors["encoder.down_blocks.0.0.conv1.weight"].clone()


def _reshape_tensor(tensors, config):
    tensors["encoder.conv_out.weight"] = tensors["encoder.conv_out.weight"][:4]


def _batch_norm(tensors, config):
    config["decoder_norm_types"] = ["batch_norm", "rms_norm", "rms_norm"]


def _misspelled_key(tensors, config):
    config["latent_channel"] = config.pop("latent_channels")


def _other_class(tensors, config):
    config["_class_name"] = "AutoencoderKL"


# edit of (tensors, config.json) -> what the one error must say
BAD = {
    "missing key": (_drop_tensor, r"1 missing keys \(decoder\.up_blocks\.2\.1\.attn\.to_qkv_multiscale\.0\.proj_out"),
    "unexpected key": (_add_tensor, r"1 unexpected keys \(encoder\.down_blocks\.0\.9\.conv1\.weight"),
    "wrong shape": (_reshape_tensor, r"wrong shapes \(encoder\.conv_out\.weight: expected \(8, 32, 3, 3\), "
                                     r"found \(4, 32, 3, 3\)"),
    "unsupported norm": (_batch_norm, r"config\.json: invalid DCAEConfig: decoder_norm_types=batch_norm is not "
                                      r"supported"),
    "unknown config key": (_misspelled_key, r"'latent_channel' \(did you mean 'latent_channels'\?\)"),
    "other model class": (_other_class, r"config of a AutoencoderKL, not of an AutoencoderDC"),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_checkpoint_gives_one_error_naming_it(saved, problem, tmp_path):
    from safetensors.torch import load_file, save_file

    edit, message = BAD[problem]
    folder = shutil.copytree(saved[0] / "single", tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors, config = load_file(weights), json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        load_dc_ae(folder)


def test_sana_f32c32_matches_diffusers_key_for_key(autoencoder_dc):
    import torch

    assert dc_ae_config_from_diffusers(SANA_VAE_CONFIG) == SANA_F32C32
    assert SANA_F32C32.factor == 32
    with torch.device("meta"):  # shapes only: the real model has 312M parameters
        reference = autoencoder_dc(**{k: v for k, v in SANA_VAE_CONFIG.items() if not k.startswith("_")})
    assert expected_torch_shapes(SANA_F32C32) == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("overrides, message", [
    (dict(decoder_block_types="UNetBlock"), r"decoder_block_types=UNetBlock is not supported"),
    (dict(decoder_act_fns="relu6"), r"decoder_act_fns=relu6 is not supported"),
    (dict(upsample_block_type="bilinear"), r"upsample_block_type=bilinear is not supported"),
    (dict(encoder_layers_per_block=(2, 2, 2)), r"encoder_layers_per_block has 3 entries for 6 stages"),
    (dict(latent_channels=24), r"encoder_out_shortcut needs encoder_block_out_channels\[-1\] divisible"),
])
def test_config_names_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        DCAEConfig(**overrides)
