"""`s2flash sample --config`: a randomly initialised model of a config, sampled with an empty
caption (one all-zero token) and written as latents and a preview: a smoke test of a config's
architecture and sampler before any weights exist. Checkpoints are sampled by pipeline.py.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from s2flash_jax.config import Config, config_to_json
from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.models.backbone import Backbone, build_backbone
from s2flash_jax.outputs import fresh_output_dir, image_grid
from s2flash_jax.sampling import few_step_sample, latent_preview
from s2flash_jax.storage import PathLike, resolve


def sample_latents(model: Backbone, config: Config) -> jax.Array:
    """Sample from seeded noise with an empty (one all-zero token) caption. Returns unit-scale
    latents [B, H, W, C_out]."""
    mcfg, scfg = model.config, config.sample
    noise_key, sampler_key = jax.random.split(jax.random.key(scfg.seed))
    noise = standard_normal(noise_key, (scfg.batch_size, scfg.height, scfg.width, mcfg.in_channels))
    caption = jnp.zeros((scfg.batch_size, 1, mcfg.caption_channels))
    caption_mask = jnp.ones((scfg.batch_size, 1), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, noise):
        return few_step_sample(nnx.merge(graphdef, state), noise, caption, caption_mask, sampler_key,
                               steps=scfg.steps, guidance_scale=scfg.guidance_scale, flow_shift=scfg.flow_shift)

    return run(state, noise)


def run_sample(config: Config, out: PathLike, *, force: bool) -> epath.Path:
    out = resolve(out)
    with fresh_output_dir(out, force=force) as staging:
        start = time.perf_counter()
        model = build_backbone(config.model, precision=config.precision, rngs=nnx.Rngs(config.seed))
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
        (staging / "config.json").write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    print(f"wrote {out}/latents.npy, preview.png, config.json", flush=True)
    return out
