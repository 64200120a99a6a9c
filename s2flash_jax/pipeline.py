"""Prompt to image: a SANA transformer with its text encoder and autoencoder, as one object.

`TextToImage.load(CKPT)` reads a model checkpoint whose model.json names its components:
  "text_encoder": a folder inside the checkpoint (the shapes demo's word-level encoder)
  "autoencoder": {"kind": "space_to_depth", "factor": f, "scaling_factor": c}
  "sampling": {"guidance_scale": w, "flow_shift": shift}   (defaults for generate)
A student (guidance embedding) samples with multistep consistency, a flow teacher with guided
Euler steps; both on the same seeded noise for the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from s2flash_jax.model_checkpoint import CheckpointError, load_params, read_metadata, read_model_config
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from s2flash_jax.models.space_to_depth import SpaceToDepthAutoencoder, SpaceToDepthConfig
from s2flash_jax.models.text_encoder import FrozenTextEncoder
from s2flash_jax.outputs import fresh_output_dir, fresh_output_file
from s2flash_jax.precision import Precision
from s2flash_jax.sampling import few_step_sample


@dataclasses.dataclass
class TextToImage:
    """model: the transformer's config; params: its nnx.Param state; guidance_scale / flow_shift:
    sampling defaults (see sampling.few_step_sample)."""

    model: SanaConfig
    params: nnx.State
    text_encoder: FrozenTextEncoder
    autoencoder: SpaceToDepthAutoencoder
    guidance_scale: float
    flow_shift: float = 1.0
    precision: Precision = Precision(param_dtype="float32", compute_dtype="float32")

    def __post_init__(self):
        self._graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: SanaTransformer(self.model, precision=self.precision, rngs=nnx.Rngs(0))))
        self._compiled: dict[tuple[int, int], Any] = {}

    @classmethod
    def load(cls, path: str | Path, precision: Precision | None = None) -> TextToImage:
        path = Path(path)
        meta = read_metadata(path)
        model = read_model_config(path)
        missing = [key for key in ("text_encoder", "autoencoder") if key not in meta]
        if missing:
            raise CheckpointError(f"model checkpoint {path} has no {' or '.join(missing)}: prompt-to-image sampling "
                                  f"needs both (checkpoints exported by `s2flash demo` carry them)")
        autoencoder = meta["autoencoder"]
        if autoencoder.get("kind") != "space_to_depth":
            raise CheckpointError(f"{path}/model.json: autoencoder kind {autoencoder.get('kind')!r} is not supported "
                                  f"(expected 'space_to_depth')")
        precision = precision or cls.precision
        abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(model, precision=precision, rngs=nnx.Rngs(0))))
        sampling = meta.get("sampling", {})
        return cls(model=model, params=load_params(path, model, abstract),
                   text_encoder=FrozenTextEncoder.load(path / meta["text_encoder"]),
                   autoencoder=SpaceToDepthAutoencoder(SpaceToDepthConfig(
                       factor=autoencoder["factor"], scaling_factor=autoencoder["scaling_factor"])),
                   guidance_scale=sampling.get("guidance_scale", 1.0), flow_shift=sampling.get("flow_shift", 1.0),
                   precision=precision)

    def _sampler(self, steps: int, batch: int, length: int):
        """Compiled (params, noise, caption, mask, null caption, key) -> unit-scale latents, per shape."""
        key = (steps, batch, length, self.guidance_scale, self.flow_shift)
        if key not in self._compiled:
            def sample(params, noise, caption, mask, null_caption, rng):
                net = nnx.merge(self._graphdef, params)
                return few_step_sample(net, noise, caption, mask, rng, steps=steps, guidance_scale=self.guidance_scale,
                                       flow_shift=self.flow_shift, null_caption=null_caption)

            c = self.model
            shapes = (self.params, jax.ShapeDtypeStruct((batch, c.sample_size, c.sample_size, c.in_channels), jnp.float32),
                      jax.ShapeDtypeStruct((batch, length, c.caption_channels), jnp.float32),
                      jax.ShapeDtypeStruct((batch, length), jnp.int32),
                      jax.ShapeDtypeStruct((length, c.caption_channels), jnp.float32), jax.random.key(0))
            self._compiled[key] = jax.jit(sample).lower(*shapes).compile()
        return self._compiled[key]

    def generate(self, prompts: Sequence[str], *, steps: int, seed: int = 0, batch_size: int = 256,
                 timings: dict[str, float] | None = None) -> np.ndarray:
        """Images [N, H, W, 3] in [0, 1] for N prompts; prompt i's noise depends only on (seed, i).

        timings, if given, gains "seconds" (sampling and decoding, compilation excluded) and "images".
        """
        embeddings, mask = self.text_encoder(list(prompts))
        c = self.model
        noise = np.asarray(jax.vmap(lambda i: jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), i), (c.sample_size, c.sample_size, c.in_channels)))(
            jnp.arange(len(prompts))))
        null_caption = np.zeros(embeddings.shape[1:], np.float32)
        images, seconds = [], 0.0
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            n = len(prompts[rows])
            pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)]) if n < batch_size else x
            sampler = self._sampler(steps, batch_size, embeddings.shape[1])
            begin = time.perf_counter()
            latents = sampler(self.params, pad(noise[rows]), pad(embeddings[rows]), pad(mask[rows]), null_caption,
                              jax.random.fold_in(jax.random.key(seed), start))
            decoded = np.asarray(self.autoencoder.decode(np.asarray(latents[:n]) / self.autoencoder.config.scaling_factor))
            seconds += time.perf_counter() - begin
            images.append(decoded)
        if timings is not None:
            timings.update(seconds=seconds, images=len(prompts))
        return np.concatenate(images)


class PromptError(ValueError):
    """A prompt the model's text encoder cannot read; the message names the problem."""


def run_sample_checkpoint(ckpt: str | Path, prompts: Sequence[str], *, out: str | Path, steps: int, seed: int = 0,
                          guidance_scale: float | None = None, force: bool = False) -> list[Path]:
    """`s2flash sample --ckpt`: one PNG per prompt, with the prompt and settings in its metadata.

    out: a .png path for a single prompt, else a directory (written whole, or not at all).
    """
    if steps < 1:
        raise PromptError(f"--steps {steps} must be >= 1")
    out = Path(out)
    single = out.suffix.lower() == ".png"
    if single and len(prompts) != 1:
        raise PromptError(f"--out {str(out)!r} is one image but {len(prompts)} prompts were given; pass a directory")
    pipeline = TextToImage.load(ckpt)
    if guidance_scale is not None:
        pipeline = dataclasses.replace(pipeline, guidance_scale=guidance_scale)
    try:  # tokenizing finds every bad prompt; generate() encodes them once
        pipeline.text_encoder.tokenizer(list(prompts))
    except ValueError as e:
        raise PromptError(str(e)) from e
    timings: dict[str, float] = {}
    images = pipeline.generate(prompts, steps=steps, seed=seed, timings=timings)
    settings = {"checkpoint": str(ckpt), "steps": steps, "seed": seed, "guidance_scale": pipeline.guidance_scale}
    if single:
        with fresh_output_file(out, force=force) as staging:
            _save_png(images[0], staging, prompts[0], {**settings, "index": 0})
        written = [out]
    else:
        with fresh_output_dir(out, force=force) as staging:
            for i, (image, text) in enumerate(zip(images, prompts)):
                _save_png(image, staging / f"{i:04d}.png", text, {**settings, "index": i})
        written = [out / f"{i:04d}.png" for i in range(len(prompts))]
    print(f"sampled {len(prompts)} image(s) in {steps} step(s), {timings['seconds']:.2f}s after compilation; "
          f"wrote {out}", flush=True)
    return written


def _save_png(image: np.ndarray, path: Path, prompt: str, settings: dict) -> None:
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("s2flash", json.dumps(settings))
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path, pnginfo=info)
