"""An exported student inside a diffusers SanaSprintPipeline, and an exported flow model inside a
SanaPipeline, sample the latents the JAX sampler does."""

import functools
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
from s2flash_jax.flows.flow_matching import shifted_times
from s2flash_jax.flows.trigflow import scm_timesteps
from s2flash_jax.model_checkpoint import load_params, read_model_config
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.precision import FP32
from s2flash_jax.sampling import few_step_sample
from tests.convert_fixtures import convert, random_transformer, save_transformer

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


# A flow model (guidance_embeds=False) exports as a SanaPipeline. name -> (timestep_scale, the model.json
# "sampling" metadata written before export, or None): the SANA-Sprint teacher's dense time embedding
# (fed s), base SANA's convention (fed 1000·s), and base SANA with a shifted schedule.
FLOW_CASES = {
    "sprint_teacher": (0.001, None),
    "base_sana": (1.0, None),
    "base_sana_shift3": (1.0, {"guidance_scale": 4.5, "flow_shift": 3.0}),
}


@pytest.fixture(scope="module", params=list(FLOW_CASES))
def flow_exported(request, teacher_pipeline, tmp_path_factory):
    """(flow model checkpoint, SanaPipeline folder exported from it, its timestep_scale, its flow shift)."""
    timestep_scale, sampling = FLOW_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = save_transformer(random_transformer({**TINY, "timestep_scale": timestep_scale}, seed=2), root / "src")
    import_checkpoint(src, "diffusers", root / "ckpt")
    if sampling is not None:
        meta = root / "ckpt" / "model.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "sampling": sampling}))
    export_checkpoint(root / "ckpt", root / "sana", pipeline=teacher_pipeline)
    return root / "ckpt", root / "sana", timestep_scale, (sampling or {}).get("flow_shift", 1.0)


def test_a_flow_model_exports_as_a_sana_pipeline(flow_exported, teacher_pipeline):
    _, sana, timestep_scale, shift = flow_exported
    index = json.loads((sana / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    scheduler = json.loads((sana / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 1000 and scheduler["shift"] == shift
    transformer = json.loads((sana / "transformer" / "config.json").read_text())
    assert transformer["timestep_scale"] == timestep_scale and transformer["guidance_embeds"] is False
    for name in ("vae", "text_encoder", "tokenizer"):  # copied as they are
        assert index[name] == json.loads((teacher_pipeline / "model_index.json").read_text())[name]
        files = sorted(p.relative_to(teacher_pipeline / name) for p in (teacher_pipeline / name).rglob("*")
                       if p.is_file())
        assert files and all((sana / name / f).read_bytes() == (teacher_pipeline / name / f).read_bytes()
                             for f in files)



def test_the_command_names_the_pipeline_it_wrote(flow_exported, exported, teacher_pipeline, tmp_path, capsys):
    for ckpt, what in ((flow_exported[0], "SanaPipeline"), (exported[0], "SanaSprintPipeline")):
        code, out, err = convert(capsys, "export", ckpt, "--out", tmp_path / what, "--pipeline", teacher_pipeline)
        assert code == 0 and f"{ckpt} as a diffusers {what} to {tmp_path / what}" in out, err
        assert json.loads((tmp_path / what / "model_index.json").read_text())["_class_name"] == what


@pytest.mark.parametrize("steps", [2, 4])
def test_exported_sana_pipeline_samples_the_latents_of_the_jax_sampler(flow_exported, steps):
    ckpt, sana, _, shift = flow_exported
    pipe = SanaPipeline.from_pretrained(sana)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.shift == shift
    with torch.no_grad():
        caption, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=6,
                                                 complex_human_instruction=None)
    assert not mask.all()  # padded prompts: the masks matter
    null = torch.randn(caption.shape[1:], generator=torch.Generator().manual_seed(3))

    noise = jax.random.normal(jax.random.key(0), (len(PROMPTS), 8, 8, LATENT_CHANNELS))
    # Our unshifted grid without its final 0: the scheduler shifts it and appends the 0 itself (its
    # default schedule would instead stop at sigma 1/1000 before the last step).
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    with torch.no_grad():
        want = pipe(prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=null.expand_as(caption), negative_prompt_attention_mask=mask,
                    sigmas=sigmas, guidance_scale=4.5,
                    latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy()), height=32, width=32,
                    max_sequence_length=6, complex_human_instruction=None, use_resolution_binning=False,
                    output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), np.asarray(shifted_times(steps, shift)), rtol=1e-6)

    config = read_model_config(ckpt)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))))
    params = load_params(ckpt, config, abstract)

    @functools.partial(jax.jit, static_argnames="flow_shift")
    def sample(params, null_caption, flow_shift):
        return few_step_sample(nnx.merge(graphdef, params), noise, jnp.asarray(caption.numpy()),
                               jnp.asarray(mask.numpy()), jax.random.key(1), steps=steps, guidance_scale=4.5,
                               flow_shift=flow_shift, null_caption=null_caption)

    got = np.asarray(sample(params, jnp.asarray(null.numpy()), shift))
    atol = 2e-5 * np.abs(want).max()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert np.abs(want).max() > 0.1 and np.abs(want - np.asarray(noise)).max() > 0.1  # a real sample
    # The comparison would notice another unconditional caption, or another schedule.
    assert np.abs(np.asarray(sample(params, jnp.zeros(null.shape), shift)) - want).max() > 100 * atol
    other_shift = 1.0 if shift != 1.0 else 3.0
    assert np.abs(np.asarray(sample(params, jnp.asarray(null.numpy()), other_shift)) - want).max() > 100 * atol
