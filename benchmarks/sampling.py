"""1-, 2- and 4-step sampling latency of the JAX student against diffusers' SanaSprintPipeline running
the same transformer (same weights, noise and caption embeddings; no text encoder, no VAE decode:
`prompt_embeds` in, latents out). Both take uniform TrigFlow times from pi/2 to 0 (the pipeline's
2-step default of an intermediate t=1.3 is turned off so the schedules agree). Before timing,
the 1-step latents of the two are checked to agree (fresh noise between steps differs, so more
steps are not compared).

  python -m benchmarks.sampling [--shapes auto|cpu|smoke|accelerator] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
from flax import nnx

from benchmarks.entry import benchmark_main
from benchmarks.forward import step_rows
from benchmarks.shapes import Shapes, model_pair
from benchmarks.torch_side import synchronised, torch_device
from conversion.sana_diffusers import sana_from_diffusers
from s2flash_jax.precision import Precision
from s2flash_jax.sampling import few_step_sample

STEPS = (1, 2, 4)
GUIDANCE_SCALE = 4.5
# Largest 1-step difference relative to max |latent|: float32 agrees to ~1e-6; bfloat16 weights and
# compute, rounded differently by the two frameworks, to a few percent.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def inputs(shapes: Shapes, channels: int, caption_channels: int) -> dict[str, np.ndarray]:
    """Noise [B, H, W, C], caption embeddings [B, L, D] and a mask padding the second half."""
    rng = np.random.default_rng(0)
    b, size, length = shapes.sample_batch, shapes.latent_size, shapes.caption_length
    mask = np.ones((b, length), np.int64)
    mask[:, max(1, length // 2):] = 0
    return {"noise": rng.standard_normal((b, size, size, channels)).astype(np.float32),
            "caption": rng.standard_normal((b, length, caption_channels)).astype(np.float32), "mask": mask}


def jax_sampler(model, arrays, steps: int):
    graphdef, state = nnx.split(model)

    @jax.jit
    def sample(state, noise, caption, mask):
        return few_step_sample(nnx.merge(graphdef, state), noise, caption, mask, jax.random.key(0), steps=steps,
                               guidance_scale=GUIDANCE_SCALE)

    args = [jnp.asarray(arrays[k]) for k in ("noise", "caption", "mask")]
    return lambda: np.asarray(jax.block_until_ready(sample(state, *args)), np.float32)


def torch_sampler(pipeline, arrays, steps: int, device: str, dtype):
    size = arrays["noise"].shape[1]
    noise = torch.from_numpy(arrays["noise"].transpose(0, 3, 1, 2).copy()).to(device)
    caption = torch.from_numpy(arrays["caption"]).to(device, dtype)
    mask = torch.from_numpy(arrays["mask"]).to(device)

    def sample():
        latents = pipeline(prompt_embeds=caption, prompt_attention_mask=mask, latents=noise, num_inference_steps=steps,
                           intermediate_timesteps=None, guidance_scale=GUIDANCE_SCALE, height=size * 32,
                           width=size * 32, output_type="latent", use_resolution_binning=False).images
        return latents.float().cpu().numpy().transpose(0, 2, 3, 1)

    return synchronised(sample, device)


def run(shapes: Shapes, repeats: int) -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    student_config, _ = model_pair(shapes)
    student_config = dataclasses.replace(student_config, logvar_head=False)  # sampling has no use for it
    torch.manual_seed(0)
    reference = SanaTransformer2DModel(**student_config.to_diffusers()).eval()
    dtype = shapes.sample_dtype
    model = sana_from_diffusers(reference.config, reference.state_dict(), precision=Precision(dtype, dtype))
    arrays = inputs(shapes, student_config.in_channels, student_config.caption_channels)
    device = torch_device()
    result = {"shapes": dataclasses.asdict(shapes), "describe": shapes.describe(), "batch": shapes.sample_batch,
              "dtype": dtype}
    jax_runs = {n: jax_sampler(model, arrays, n) for n in STEPS}
    if device is not None:
        torch_dtype = getattr(torch, dtype)
        reference.to(device)
        if torch_dtype != torch.float32:
            reference.to(torch_dtype)
        pipeline = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=SCMScheduler(),
                                      transformer=reference)
        pipeline.set_progress_bar_config(disable=True)
        torch_runs = {n: torch_sampler(pipeline, arrays, n, device, torch_dtype) for n in STEPS}
        got, want = jax_runs[1](), torch_runs[1]()
        difference = float(np.abs(got - want).max() / np.abs(want).max())
        if not difference <= CHECK_TOLERANCE[dtype]:
            raise SystemExit(f"1-step latents differ: {difference:.2e} of max |latent| > {CHECK_TOLERANCE[dtype]}")
        result["one_step_max_rel_diff"] = difference
    result["rows"] = step_rows(jax_runs, torch_runs if device is not None else {}, repeats)
    return result


if __name__ == "__main__":
    benchmark_main(run, __doc__.splitlines()[0])
