"""Prompt to image end to end, 1, 2 and 4 steps: `s2flash sample`'s JAX path (Gemma-2 caption encoding,
SANA-Sprint sampling, DC-AE decoding: `pipeline.TextToImage`) against diffusers' SanaSprintPipeline on
the same random weights, prompts and noise.

The pipeline is built from configs (nothing downloaded) and saved as a diffusers SanaSprintPipeline;
JAX reads that folder as a user would (`s2flash convert import` of its transformer, the torch-free
Gemma-2 and DC-AE loaders). On a GPU or TPU: SANA-Sprint 0.6B at 1024 px with Gemma-2-2B and SANA's
DC-AE f32c32 in bfloat16, 300-token captions; on a CPU: the tiny student with a 2-layer Gemma-2 and a
narrow DC-AE of SANA's architecture (six stages, f32, EfficientViT blocks in the deep three), in
float32. Both sides: the complex human instruction, guidance 4.5, uniform TrigFlow times (the
pipeline's 2-step intermediate time 1.3 turned off, as our sampler has none). A call is the whole
`generate` / `pipe(...)`: tokenizing, encoding, sampling, decoding to images. The 1-step images of
the two are checked to agree before timing.

  python -m benchmarks.text_to_image [--shapes auto|cpu|smoke|accelerator] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler  # noqa: E402

from benchmarks.entry import benchmark_main  # noqa: E402
from benchmarks.forward import step_rows  # noqa: E402
from benchmarks.shapes import Shapes, model_pair  # noqa: E402
from benchmarks.torch_side import synchronised, torch_device  # noqa: E402
from conversion.dc_ae import load_dc_ae  # noqa: E402
from conversion.gemma2 import load_caption_encoder  # noqa: E402
from conversion.importer import import_checkpoint  # noqa: E402
from s2flash_jax.data.captions import CaptionTruncatedWarning  # noqa: E402
from s2flash_jax.models.dc_ae import SANA_F32C32  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402
from s2flash_jax.precision import Precision  # noqa: E402

STEPS = (1, 2, 4)
PROMPTS = ["a small red circle on the left of a big blue square", "a green triangle above a yellow star",
           "two blue circles", "a red square right of a green circle"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
# Largest 1-step difference of the images (in [0, 1]): float32 agrees to ~1e-6; bfloat16 weights and
# compute, rounded differently by the two frameworks, to a few percent.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1}
# The CPU stand-in for SANA's DC-AE: its architecture, narrow and one block per stage.
NARROW_DC_AE = dataclasses.replace(SANA_F32C32, encoder_block_out_channels=(8, 16, 32, 32, 64, 64),
                                   decoder_block_out_channels=(8, 16, 32, 32, 64, 64), attention_head_dim=8,
                                   encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6)


def tokenizer():
    """A word-level tokenizer of the prompts' words (Gemma's vocabulary would need a download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_pipeline(shapes: Shapes, folder: Path) -> str:
    """Save a random SanaSprintPipeline of the preset's shapes in `folder`; returns a description."""
    from transformers import Gemma2Config, Gemma2Model

    student, _ = model_pair(shapes)
    student = dataclasses.replace(student, logvar_head=False, sample_size=shapes.latent_size)
    accelerator = shapes.name == "accelerator"
    dc_ae = SANA_F32C32 if accelerator else dataclasses.replace(NARROW_DC_AE, latent_channels=student.in_channels)
    width = student.caption_channels
    gemma = Gemma2Config(vocab_size=len(WORDS) + 4, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         **({} if accelerator else dict(hidden_size=width, intermediate_size=4 * width,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        num_key_value_heads=1, head_dim=width // 2)))
    torch.manual_seed(0)
    dtype = getattr(torch, shapes.sample_dtype)
    cast = (lambda m: m.eval()) if dtype == torch.float32 else (lambda m: m.eval().to(dtype))  # noqa: E731
    pipe = SanaSprintPipeline(tokenizer=tokenizer(), text_encoder=cast(Gemma2Model(gemma)),
                              vae=cast(AutoencoderDC(**dataclasses.asdict(dc_ae))),
                              transformer=cast(SanaTransformer2DModel(**student.to_diffusers())),
                              scheduler=SCMScheduler())
    pipe.save_pretrained(folder)
    return (f"Gemma-2 width {gemma.hidden_size} x {gemma.num_hidden_layers} layers, DC-AE f{dc_ae.factor}c"
            f"{dc_ae.latent_channels} widths {list(dc_ae.decoder_block_out_channels)}, "
            f"{shapes.latent_size * dc_ae.factor} px")


def run(shapes: Shapes, repeats: int) -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    # The small presets' captions are shorter than the prompts; both sides cut them alike.
    warnings.filterwarnings("ignore", category=CaptionTruncatedWarning)
    with tempfile.TemporaryDirectory() as tmp:
        return _run(shapes, repeats, Path(tmp))


def _run(shapes: Shapes, repeats: int, tmp: Path) -> dict:
    dtype = shapes.sample_dtype
    precision = Precision(dtype, dtype)
    prompts = (PROMPTS * shapes.sample_batch)[:shapes.sample_batch]
    components = build_pipeline(shapes, tmp / "sprint")
    import_checkpoint(tmp / "sprint" / "transformer", "diffusers", tmp / "ckpt")
    jax_pipe = TextToImage.load(
        tmp / "ckpt", precision,
        text_encoder=load_caption_encoder(tmp / "sprint", precision=precision, caption_length=shapes.caption_length,
                                          lowercase=True),
        autoencoder=load_dc_ae(tmp / "sprint", precision=precision))
    noise = jax_pipe.noise(0, len(prompts))
    size = shapes.latent_size * jax_pipe.autoencoder.config.factor
    device = torch_device()
    if device is not None:
        torch_pipe = SanaSprintPipeline.from_pretrained(tmp / "sprint", torch_dtype=getattr(torch, dtype)).to(device)
        torch_pipe.set_progress_bar_config(disable=True)

    def jax_run(steps: int):
        return lambda: jax_pipe.generate(prompts, steps=steps, seed=0, batch_size=len(prompts))

    def torch_run(steps: int):
        latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).to(device)

        def sample():
            with torch.no_grad():
                return torch_pipe(prompt=prompts, num_inference_steps=steps, intermediate_timesteps=None,
                                  latents=latents, height=size, width=size, use_resolution_binning=False,
                                  max_sequence_length=shapes.caption_length, output_type="np").images

        return synchronised(sample, device)

    result = {"shapes": dataclasses.asdict(shapes), "describe": shapes.describe(), "components": components,
              "batch": len(prompts), "dtype": dtype}
    jax_runs = {n: jax_run(n) for n in STEPS}
    torch_runs = {n: torch_run(n) for n in STEPS} if device is not None else {}
    if torch_runs:
        got, want = jax_runs[1](), torch_runs[1]()
        difference = float(np.abs(got - want).max())
        if not difference <= CHECK_TOLERANCE[dtype]:
            raise SystemExit(f"1-step images differ by {difference:.2e} > {CHECK_TOLERANCE[dtype]}")
        result["one_step_max_abs_diff"] = difference
    result["rows"] = step_rows(jax_runs, torch_runs, repeats)
    return result


if __name__ == "__main__":
    benchmark_main(run, __doc__.splitlines()[0])
