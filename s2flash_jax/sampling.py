"""`s2flash sample`: few-step sampling from a SANA transformer, written to an output directory.

Until a checkpoint format and a text encoder land, the model is randomly initialised from the config
and conditioned on an empty (all-zero, one-token) caption; the output is a preview of the latents.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2flash_jax.config import Config
from s2flash_jax.flows.flow_matching import euler_sample, time_embedder_input
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.outputs import fresh_output_dir, image_grid


def sample_latents(model: SanaTransformer, config: Config) -> jax.Array:
    """Integrate the model's flow from seeded noise. Returns latents [B, H, W, C_out]."""
    mcfg, scfg = model.config, config.sample
    batch = scfg.batch_size
    noise = jax.random.normal(jax.random.key(scfg.seed), (batch, scfg.height, scfg.width, mcfg.in_channels))
    caption = jnp.zeros((batch, 1, mcfg.caption_channels))
    caption_mask = jnp.ones((batch, 1), jnp.int32)
    guidance = (jnp.full((batch,), scfg.guidance_scale * mcfg.guidance_embeds_scale)
                if mcfg.guidance_embeds else None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, noise):
        net = nnx.merge(graphdef, state)
        return euler_sample(lambda x, s: net(x, time_embedder_input(mcfg, s), caption, caption_mask, guidance), noise, scfg.steps)

    return run(state, noise)


def latent_preview(latents: np.ndarray, min_size: int = 128) -> np.ndarray:
    """First three latent channels, min-max scaled per image and enlarged. [B, H, W, C] -> [B, h, w, 3]."""
    rgb = latents[..., :3] if latents.shape[-1] >= 3 else np.repeat(latents[..., :1], 3, axis=-1)
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    rgb = (rgb - lo) / np.maximum(hi - lo, 1e-8)
    scale = max(1, int(np.ceil(min_size / max(rgb.shape[1:3]))))
    return rgb.repeat(scale, axis=1).repeat(scale, axis=2)


def run_sample(config: Config, out: str | Path, *, force: bool) -> Path:
    out = Path(out)
    with fresh_output_dir(out, force=force) as staging:
        start = time.perf_counter()
        model = SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(config.seed))
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        print(f"model: {config.model.num_layers} layers, width {config.model.inner_dim}, "
              f"{n_params / 1e6:.2f}M parameters (random init, seed {config.seed}); built in "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        start = time.perf_counter()
        latents = np.asarray(jax.block_until_ready(sample_latents(model, config)))
        elapsed = time.perf_counter() - start
        s = config.sample
        print(f"sampled {s.batch_size} x {s.height}x{s.width} latents in {s.steps} steps: "
              f"{elapsed:.1f}s including compilation", flush=True)
        if not np.isfinite(latents).all():
            raise FloatingPointError("sampling produced non-finite latents; nothing was written")
        np.save(staging / "latents.npy", latents)
        image_grid(latent_preview(latents)).save(staging / "preview.png")
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    print(f"wrote {out}/latents.npy, preview.png, config.json", flush=True)
    return out
