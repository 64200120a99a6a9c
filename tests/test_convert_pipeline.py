"""An exported student inside a diffusers SanaSprintPipeline samples the latents the JAX sampler does."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import diffusers.schedulers.scheduling_scm as scheduling_scm
from conversion.exporter import export_checkpoint
from conversion.importer import import_checkpoint
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaSprintPipeline
from s2flash_jax.flows.trigflow import scm_timesteps
from s2flash_jax.model_checkpoint import load_params, read_model_config
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.precision import FP32
from s2flash_jax.sampling import few_step_sample
from tests.convert_fixtures import random_transformer, save_transformer

TEXT_WIDTH, LATENT_CHANNELS = 16, 4
WORDS = "a red blue circle square on the left right".split()
PROMPTS = ["a red circle on the left", "blue square"]
TINY = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, caption_channels=TEXT_WIDTH,
            qk_norm="rms_norm_across_heads")


@pytest.fixture(scope="module")
def teacher_pipeline(tmp_path_factory):
    """A tiny random SanaPipeline folder (DC-AE, Gemma-2, word-level tokenizer, flow teacher), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2, eos_token_id=1))
    vae = AutoencoderDC(in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), scaling_factor=0.41407)
    pipe = SanaPipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                          pad_token="<pad>", unk_token="<unk>"),
        text_encoder=text_encoder, vae=vae, transformer=random_transformer({**TINY, "timestep_scale": 0.001}),
        scheduler=FlowMatchEulerDiscreteScheduler())
    path = tmp_path_factory.mktemp("teacher") / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(teacher_pipeline, tmp_path_factory):
    """(student model checkpoint, SanaSprintPipeline folder exported from it)."""
    root = tmp_path_factory.mktemp("student")
    src = save_transformer(random_transformer({**TINY, "guidance_embeds": True}, seed=1), root / "src")
    import_checkpoint(src, "diffusers", root / "ckpt")
    export_checkpoint(root / "ckpt", root / "sprint", pipeline=teacher_pipeline)
    return root / "ckpt", root / "sprint"


def test_the_pipeline_folder_is_a_sana_sprint_pipeline(exported):
    _, sprint = exported
    index = json.loads((sprint / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline" and index["scheduler"] == ["diffusers", "SCMScheduler"]
    scheduler = json.loads((sprint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "trigflow" and scheduler["sigma_data"] == 0.5


@pytest.mark.parametrize("steps", [1, 2])
def test_exported_pipeline_samples_the_latents_of_the_jax_sampler(exported, steps, monkeypatch):
    ckpt, sprint = exported
    pipe = SanaSprintPipeline.from_pretrained(sprint)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        caption, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=6, complex_human_instruction=None)

    noise_key, sampler_key = jax.random.split(jax.random.key(0))
    noise = jax.random.normal(noise_key, (len(PROMPTS), 8, 8, LATENT_CHANNELS))
    # The fresh noise scm_sample draws before each later step; the scheduler draws it through randn_tensor.
    step_keys = jax.random.split(sampler_key, len(scm_timesteps(steps)))
    fresh = [torch.from_numpy(np.asarray(jax.random.normal(k, noise.shape)).transpose(0, 3, 1, 2).copy())
             for k in step_keys[:steps]]
    monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda shape, **_: fresh.pop(0))
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, num_inference_steps=steps, intermediate_timesteps=None, guidance_scale=4.5,
                    latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy()), height=32, width=32,
                    max_sequence_length=6, complex_human_instruction=None, use_resolution_binning=False,
                    output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    assert fresh == []  # one draw per step

    config = read_model_config(ckpt)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))))
    sample = jax.jit(lambda params, *args: few_step_sample(nnx.merge(graphdef, params), *args, steps=steps,
                                                           guidance_scale=4.5))
    got = np.asarray(sample(load_params(ckpt, config, abstract), noise, jnp.asarray(caption.numpy()),
                            jnp.asarray(mask.numpy()), sampler_key))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert np.abs(want).max() > 0.1  # a real sample, not zeros
