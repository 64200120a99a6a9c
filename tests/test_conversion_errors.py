"""A state dict that does not fit the model fails with one error naming every problem, and writes nothing."""

import numpy as np
import pytest
import torch

from conversion.sana_diffusers import StateDictMismatch, load_diffusers_state_dict, sana_from_diffusers
from s2flash_jax.models.params import flat_params
from s2flash_jax.precision import FP32
from tests.sana_reference import torch_model


def test_corrupted_state_dict_lists_every_bad_key_and_leaves_the_model_untouched():
    reference = torch_model("sprint_guidance_qknorm")
    model = sana_from_diffusers(reference.config, reference.state_dict(), precision=FP32)
    before = {k: np.asarray(v) for k, v in flat_params(model).items()}

    corrupted = dict(reference.state_dict())
    del corrupted["transformer_blocks.1.attn2.to_k.bias"]
    corrupted["caption_norm.weight"] = torch.zeros(7)
    corrupted["transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)
    with pytest.raises(StateDictMismatch) as info:
        load_diffusers_state_dict(model, corrupted)
    message = str(info.value)
    assert "missing keys (1):\n  transformer_blocks.1.attn2.to_k.bias: expected (32,)" in message
    assert "unexpected keys (1):\n  transformer_blocks.0.attn1.to_q.bias: found (32,)" in message
    assert "wrong shapes (1):\n  caption_norm.weight: expected (32,), found (7,)" in message

    for key, value in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(value), before[key], err_msg=key)


def test_config_mismatch_is_reported_as_shapes():
    """Loading a guidance-embedding checkpoint into a model built without it names the extra tensors."""
    reference = torch_model("sprint_guidance_qknorm")
    config = {**reference.config, "guidance_embeds": False}
    with pytest.raises(StateDictMismatch) as info:
        sana_from_diffusers(config, reference.state_dict(), precision=FP32)
    message = str(info.value)
    # without guidance, diffusers nests the time MLP under AdaLayerNormSingle's `emb`
    assert "missing keys (4):\n  time_embed.emb.timestep_embedder.linear_1.weight: expected (32, 256)" in message
    assert "unexpected keys (8):" in message
    assert "  time_embed.guidance_embedder.linear_2.bias: found (32,)" in message
