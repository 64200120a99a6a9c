"""Few-step sampling of a denoiser: the one sampler `sample`, training previews, health checks,
quantization sweeps and evaluation share.

A SANA-Sprint student (guidance embedding) is sampled as `SanaSprintPipeline` does: TrigFlow wrapper
and multistep consistency sampling. A flow teacher is integrated with Euler steps as `SanaPipeline`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.flows.flow_matching import classifier_free_guidance, euler_sample
from s2flash_jax.flows.twinflow import any_step_sample, sampling_times
from s2flash_jax.flows.trigflow import SIGMA_DATA, scm_sample, scm_timesteps, trigflow_from_flow_matching
from s2flash_jax.models.backbone import Backbone


def few_step_sample(model: Backbone, noise: jax.Array, caption: jax.Array, caption_mask: jax.Array | None,
                    key: jax.Array, *, steps: int, guidance_scale: float, flow_shift: float = 1.0,
                    null_caption: jax.Array | None = None) -> jax.Array:
    """Unit-scale latents [B, H, W, C] from noise [B, H, W, C] for captions [B, L, C_text].

    A TwinFlow student (twinflow_embeds) jumps to the data and re-noises at TwinFlow's sampling
    times (flow_shift-warped), guidance baked in. A student (guidance embedding) samples as SanaSprintPipeline: multistep consistency sampling
    of its TrigFlow wrapper, guidance embedding fed guidance_scale x guidance_embeds_scale. A flow
    teacher takes Euler steps on the flow_shift-warped schedule, with classifier-free guidance
    against null_caption [L, C_text] (paired with each prompt's mask) when one is given.
    """
    mcfg = model.config
    if mcfg.twinflow_embeds:
        def average_velocity(x, s, r):
            return model(x, s, caption, caption_mask, target_s=r)

        return any_step_sample(average_velocity, noise, key, sampling_times(steps, shift=flow_shift))
    guidance = (jnp.full((noise.shape[0],), guidance_scale * mcfg.guidance_embeds_scale)
                if mcfg.guidance_embeds else None)

    def velocity(x, s):
        return model(x, s, caption, caption_mask, guidance)

    if mcfg.guidance_embeds:
        return scm_sample(trigflow_from_flow_matching(velocity), noise, key,
                          scm_timesteps(steps, shift=flow_shift)) / SIGMA_DATA
    if null_caption is None or guidance_scale == 1.0:
        return euler_sample(velocity, noise, steps, shift=flow_shift)
    captions = jnp.concatenate([jnp.broadcast_to(null_caption.astype(caption.dtype), caption.shape), caption])
    masks = None if caption_mask is None else jnp.concatenate([caption_mask, caption_mask])

    def guided_velocity(x, s):
        both = model(jnp.concatenate([x, x]), jnp.concatenate([s, s]), captions, masks)
        return classifier_free_guidance(*jnp.split(both, 2), guidance_scale)

    return euler_sample(guided_velocity, noise, steps, shift=flow_shift)


def latent_preview(latents: np.ndarray, min_size: int = 128) -> np.ndarray:
    """First three latent channels, min-max scaled per image and enlarged. [B, H, W, C] -> [B, h, w, 3]."""
    rgb = latents[..., :3] if latents.shape[-1] >= 3 else np.repeat(latents[..., :1], 3, axis=-1)
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    rgb = (rgb - lo) / np.maximum(hi - lo, 1e-8)
    scale = max(1, int(np.ceil(min_size / max(rgb.shape[1:3]))))
    return rgb.repeat(scale, axis=1).repeat(scale, axis=2)
