"""Shared fixtures for comparing the JAX SANA transformer with diffusers' `SanaTransformer2DModel`."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from diffusers import SanaTransformer2DModel

BASE = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
    mlp_ratio=2.5, sample_size=8, patch_size=1,
)

# name -> (diffusers config overrides, latent (H, W), padded text mask?)
CASES = {
    "sprint_guidance_qknorm": (dict(guidance_embeds=True, qk_norm="rms_norm_across_heads"), (6, 10), True),
    "teacher_posembed_patch2": (dict(interpolation_scale=1.0, patch_size=2), (8, 12), True),
    "posembed_rescaled_affine_bias": (
        dict(qk_norm="rms_norm_across_heads", interpolation_scale=2.0, sample_size=16, norm_elementwise_affine=True,
             attention_bias=True, out_channels=6, num_cross_attention_heads=3, cross_attention_head_dim=8),
        (12, 8), False),
}


@dataclasses.dataclass
class Inputs:
    """The same inputs in both layouts. x is NCHW for torch; `jax_x` is NHWC. s is flow time in [0, 1]
    (what the JAX model takes); timestep is what diffusers' pipelines feed for it."""

    x: np.ndarray
    s: np.ndarray
    timestep: np.ndarray
    caption: np.ndarray
    mask: np.ndarray | None
    guidance: np.ndarray | None

    @property
    def jax_x(self) -> np.ndarray:
        return self.x.transpose(0, 2, 3, 1)


def torch_model(case: str, seed: int = 0) -> SanaTransformer2DModel:
    """A tiny diffusers model whose every parameter is random (no ones / zeros left from init)."""
    overrides, _, _ = CASES[case]
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(case: str, batch: int = 2, seed: int = 1) -> Inputs:
    overrides, (h, w), padded = CASES[case]
    rng = np.random.default_rng(seed)
    config = {**BASE, **overrides}
    length = 7
    mask = None
    if padded:
        mask = np.ones((batch, length), np.int64)
        mask[0, 3:] = 0  # first caption has 3 tokens, the rest padding
    guided = overrides.get("guidance_embeds", False)
    x = rng.standard_normal((batch, config["in_channels"], h, w)).astype(np.float32)
    s = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    return Inputs(
        x=x, s=s,
        # SanaSprintPipeline feeds students flow time s; SanaPipeline feeds flow models 1000·s.
        timestep=s * np.float32(1.0 if guided else 1000.0),
        caption=rng.standard_normal((batch, length, config["caption_channels"])).astype(np.float32),
        mask=mask,
        guidance=rng.uniform(0.4, 0.5, batch).astype(np.float32) if guided else None,
    )


def torch_forward(model: SanaTransformer2DModel, inp: Inputs) -> np.ndarray:
    """Returns NHWC float32 output for direct comparison with JAX."""
    t = torch.from_numpy
    with torch.no_grad():
        out = model(
            t(inp.x), t(inp.caption), t(inp.timestep),
            guidance=None if inp.guidance is None else t(inp.guidance),
            encoder_attention_mask=None if inp.mask is None else t(inp.mask),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)
