"""Prompt to image: a SANA transformer with its text encoder and autoencoder, as one object.

`TextToImage.load(CKPT)` reads a model checkpoint whose model.json names its components:
  "text_encoder": a folder inside the checkpoint (the shapes demo's word-level encoder)
  "autoencoder": {"kind": "space_to_depth", "factor": f, "scaling_factor": c, "image_channels": n}
  "sampling": {"guidance_scale": w, "flow_shift": shift}   (defaults for generate)
`TextToImage.load(CKPT, text_encoder=..., autoencoder=...)` takes them from elsewhere instead, e.g.
SANA's Gemma-2 `CaptionEncoder` and `DCAutoencoder` (which conversion/ loads; `s2flash sample
--text-encoder --vae`). Any pair fits that has the small interface below (`TextEncoder`,
`Autoencoder`): the shapes demo's components and SANA's both do.

A quantized checkpoint (`s2flash quantize`) loads as qwix's quantized transformer: int8 / int4
weights, dequantized inside each compiled matmul (quantize.py).

A student (guidance embedding) samples as SanaSprintPipeline does (multistep consistency, guidance
embedding), a flow teacher with guided Euler steps; both on the same seeded noise for the same seed.
Prompts go in batches of a fixed size (the last one padded); text encoding, sampling and decoding
are each compiled once per shape and run data-parallel: the batch split over every device (the
mesh's data axis), the weights replicated.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.model_checkpoint import CheckpointError, load_params, read_metadata, read_model_config
from s2flash_jax.models.backbone import BackboneConfig, abstract_backbone
from s2flash_jax.models.space_to_depth import SpaceToDepthAutoencoder, SpaceToDepthConfig
from s2flash_jax.models.text_encoder import FrozenTextEncoder
from s2flash_jax.outputs import fresh_output_dir, fresh_output_file, to_uint8
from s2flash_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, pad_rows
from s2flash_jax.precision import FP32, Precision
from s2flash_jax.sampling import few_step_sample
from s2flash_jax.storage import PathLike, resolve

DEFAULT_BATCH_SIZE = 256  # for checkpoints that carry their own (small) components: the shapes demo's
# For checkpoints that name no sampling defaults: SanaSprintPipeline's (and SanaPipeline's) guidance.
DEFAULT_GUIDANCE_SCALE = 4.5


class TextEncoder(Protocol):
    """What TextToImage needs of a text encoder (`FrozenTextEncoder`, Gemma-2's `CaptionEncoder`)."""

    params: Any  # the weights `embed` takes; TextToImage replaces them by copies on its mesh

    @property
    def width(self) -> int:
        """D, the width of the embeddings (the transformer's caption_channels)."""

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """On the host: (ids, mask) int [B, T], T fixed; ValueError naming a prompt it cannot read."""

    def embed(self, params: Any, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pure and jittable: (ids, mask) [B, T] -> (embeddings float32 [B, L, D], mask [B, L])."""


class Autoencoder(Protocol):
    """What TextToImage needs of an autoencoder (`SpaceToDepthAutoencoder`, `DCAutoencoder`). An
    nnx.Module's parameters are passed to the compiled decoder as an argument (and replicated)."""

    config: Any  # with scaling_factor and latent_channels

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw latents [B, h, w, C] -> images [B, H, W, 3] in [0, 1]; traceable."""


class PromptError(ValueError):
    """A prompt the model's text encoder cannot read; the message names the problem."""


def batch_key(seed: int, start: int) -> jax.Array:
    """The key of the batch that starts at prompt `start`: multistep samplers draw their fresh noise from it."""
    return jax.random.fold_in(jax.random.key(seed), start)


@dataclasses.dataclass
class TextToImage:
    """model: the transformer's config; params: its nnx.Param state; guidance_scale / flow_shift:
    sampling defaults (see sampling.few_step_sample); batch_size: generate's default; graphdef: the
    transformer's nnx graph that `params` fill (None: the plain backbone of `model`; a quantized
    checkpoint's is qwix's quantized model, see quantize.py)."""

    model: BackboneConfig
    params: nnx.State
    text_encoder: TextEncoder
    autoencoder: Autoencoder
    guidance_scale: float
    flow_shift: float = 1.0
    precision: Precision = FP32
    batch_size: int = DEFAULT_BATCH_SIZE
    graphdef: Any = None

    def __post_init__(self):
        self._check_components()
        self._graphdef = self.graphdef if self.graphdef is not None else nnx.graphdef(abstract_backbone(self.model, self.precision))
        self._mesh = make_mesh(MeshConfig(data=-1))  # every device on the data axis
        self._replicated = NamedSharding(self._mesh, PartitionSpec())
        self._batch = batch_sharding(self._mesh)
        # One copy of every weight on every device (a no-op where they are already there).
        self.params = jax.device_put(self.params, self._replicated)
        self.text_encoder.params = jax.device_put(self.text_encoder.params, self._replicated)
        if isinstance(self.autoencoder, nnx.Module):
            nnx.update(self.autoencoder, jax.device_put(nnx.state(self.autoencoder), self._replicated))
        self._decode, self._decoder_params = self._decoder()
        self._compiled: dict[tuple, Any] = {}

    def _check_components(self) -> None:
        c, width = self.model, self.text_encoder.width
        channels = self.autoencoder.config.latent_channels
        problems = []
        if width != c.caption_channels:
            problems.append(f"the text encoder's embeddings are {width} wide, the transformer's caption_channels="
                            f"{c.caption_channels}")
        if channels != c.in_channels or channels != c.output_channels:
            problems.append(f"the autoencoder's latents have {channels} channels, the transformer's in_channels="
                            f"{c.in_channels} and out_channels={c.output_channels}")
        if problems:
            raise CheckpointError(f"the text encoder and autoencoder do not fit the transformer: {'; '.join(problems)}")

    @classmethod
    def load(cls, path: PathLike, precision: Precision | None = None, *, text_encoder: TextEncoder | None = None,
             autoencoder: Autoencoder | None = None) -> TextToImage:
        """The checkpoint's transformer (on every device) with `text_encoder` / `autoencoder` where given,
        else the ones its model.json names. Without sampling defaults in model.json: guidance scale
        DEFAULT_GUIDANCE_SCALE, flow shift 1 (SanaSprintPipeline's schedule)."""
        path = resolve(path)
        meta = read_metadata(path)
        model = read_model_config(path)
        missing = [(key, flag) for key, flag, given in (("text_encoder", "--text-encoder", text_encoder),
                                                        ("autoencoder", "--vae", autoencoder))
                   if given is None and key not in meta]
        if missing:
            raise CheckpointError(
                f"model checkpoint {path} has no {' or '.join(k for k, _ in missing)}: prompt-to-image sampling "
                f"needs both; pass {' and '.join(f for _, f in missing)} (SANA's Gemma-2 and DC-AE, e.g. a diffusers "
                f"pipeline folder), or use a checkpoint that carries them (as `s2flash demo` exports)")
        if autoencoder is None:
            kind = meta["autoencoder"].get("kind")
            if kind != "space_to_depth":
                raise CheckpointError(f"{path}/model.json: autoencoder kind {kind!r} is not supported "
                                      f"(expected 'space_to_depth'); pass --vae")
            fields = {k: v for k, v in meta["autoencoder"].items() if k != "kind"}
            try:
                autoencoder = SpaceToDepthAutoencoder(SpaceToDepthConfig(**fields))
            except TypeError as e:
                raise CheckpointError(f"{path}/model.json: autoencoder {fields} does not fit SpaceToDepthConfig "
                                      f"(expected factor, scaling_factor, image_channels): {e}") from None
        own_components = text_encoder is None
        if text_encoder is None:
            text_encoder = FrozenTextEncoder.load(path / meta["text_encoder"])
        precision = precision or cls.precision
        quantized = "quantization" in meta
        if quantized:  # int8 / int4 weights, matmuls through qwix (quantize.py, imported only for these)
            from s2flash_jax.quantize import abstract_quantized_model, read_quantization

            net = abstract_quantized_model(model, read_quantization(path), precision)
        else:
            net = abstract_backbone(model, precision)
        graphdef, abstract = nnx.split(net)
        replicated = NamedSharding(make_mesh(MeshConfig(data=-1)), PartitionSpec())
        sampling = meta.get("sampling", {})
        params = load_params(path, model, abstract, jax.tree.map(lambda _: replicated, abstract), quantized=quantized)
        return cls(model=model, params=params, text_encoder=text_encoder, autoencoder=autoencoder,
                   guidance_scale=sampling.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
                   flow_shift=sampling.get("flow_shift", 1.0), precision=precision,
                   batch_size=DEFAULT_BATCH_SIZE if own_components else jax.device_count(), graphdef=graphdef)

    def sweep_inputs(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 1):
        """What `generate(prompts, steps=steps, seed=seed)` starts from, as quantize.SweepInputs: the
        text encoder's embeddings of `prompts`, the initial noise, guidance scale, flow shift and null
        caption (fresh noise beyond one step comes from a fixed key, not generate's per-batch keys)."""
        from s2flash_jax.quantize import SweepInputs

        encoder = self.text_encoder
        ids, mask = encoder.tokenize(list(prompts))
        caption, caption_mask = encoder.embed(encoder.params, jnp.asarray(ids), jnp.asarray(mask))
        return SweepInputs(jnp.asarray(self.noise(seed, len(prompts))), caption, caption_mask,
                           self.guidance_scale, self.flow_shift, steps, jnp.zeros(caption.shape[1:], jnp.float32))

    def round_batch_size(self, batch_size: int) -> int:
        """batch_size rounded up to a multiple of the device count (each device takes an equal share)."""
        if batch_size < 1:
            raise PromptError(f"batch size {batch_size} must be >= 1")
        devices = self._mesh.size
        return -(-batch_size // devices) * devices

    def batch_size_for(self, count: int, batch_size: int | None = None) -> int:
        """The batch `generate` uses for `count` prompts: batch_size (default self.batch_size), at
        most count (fewer prompts make a smaller batch, not one padded with copies), rounded up."""
        return self.round_batch_size(min(batch_size or self.batch_size, max(count, 1)))

    def noise(self, seed: int, count: int) -> np.ndarray:
        """Initial noise float32 [count, h, w, C] of prompts 0..count-1; prompt i's depends only on (seed, i)."""
        c = self.model
        return np.asarray(jax.vmap(lambda i: standard_normal(
            jax.random.fold_in(jax.random.key(seed), i), (c.sample_size, c.sample_size, c.in_channels)))(
            jnp.arange(count)))

    def _stages(self, steps: int, batch: int, ids: jax.Array, mask: jax.Array, noise: jax.Array):
        """(embed, sample, decode, null caption): the stages compiled for one batch shape (cached)."""
        key = (steps, batch, ids.shape[1], self.guidance_scale, self.flow_shift)
        if key in self._compiled:
            return self._compiled[key]
        rep, sharded = self._replicated, self._batch

        def compiled(fn, args, in_shardings, out_shardings):
            return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings).lower(*args).compile()

        encoder = self.text_encoder
        embed = compiled(encoder.embed, (encoder.params, ids, mask), (rep, sharded, sharded), (sharded, sharded))
        caption, caption_mask = jax.eval_shape(encoder.embed, encoder.params, ids, mask)
        null_caption = jax.device_put(jnp.zeros(caption.shape[1:], jnp.float32), rep)

        def sample(params, noise, caption, mask, null_caption, rng):
            net = nnx.merge(self._graphdef, params)
            return few_step_sample(net, noise, caption, mask, rng, steps=steps, guidance_scale=self.guidance_scale,
                                   flow_shift=self.flow_shift, null_caption=null_caption)

        sampler = compiled(sample, (self.params, noise, caption, caption_mask, null_caption, jax.random.key(0)),
                           (rep, sharded, sharded, sharded, rep, rep), sharded)
        latents = jax.ShapeDtypeStruct(noise.shape[:3] + (self.model.output_channels,), jnp.float32)
        decode = compiled(self._decode, (self._decoder_params, latents), (rep, sharded), sharded)
        self._compiled[key] = embed, sampler, decode, null_caption
        return self._compiled[key]

    def _decoder(self):
        """(decode(params, unit-scale latents) -> images, params) for the autoencoder."""
        autoencoder = self.autoencoder
        scale = autoencoder.config.scaling_factor
        if isinstance(autoencoder, nnx.Module):
            graphdef, state = nnx.split(autoencoder)
            return (lambda params, z: nnx.merge(graphdef, params).decode(z / scale)), state
        return (lambda params, z: autoencoder.decode(z / scale)), None

    def generate(self, prompts: Sequence[str], *, steps: int, seed: int = 0, batch_size: int | None = None,
                 timings: dict[str, float] | None = None) -> np.ndarray:
        """Images [N, H, W, 3] in [0, 1] for N prompts; prompt i's initial noise depends only on (seed, i).

        The batch size is `batch_size_for(N, batch_size)`; the last batch is padded with copies of
        its last prompt. Multistep sampling draws its fresh noise per batch (`batch_key`), so beyond
        one step an image depends on the batch size too. timings, if given, gains "seconds" (text encoding, sampling and decoding,
        compilation and host-to-device copies excluded) and "images".
        """
        prompts = list(prompts)
        batch = self.batch_size_for(len(prompts), batch_size)
        try:
            ids, mask = self.text_encoder.tokenize(prompts)
        except ValueError as e:
            raise PromptError(str(e)) from e
        noise = self.noise(seed, len(prompts))
        images, seconds = [], 0.0
        for start in range(0, len(prompts), batch):
            n = min(batch, len(prompts) - start)
            batch_noise, batch_ids, batch_mask = (jax.device_put(pad_rows(x[start:start + n], batch), self._batch)
                                                  for x in (noise, ids, mask))
            embed, sampler, decode, null_caption = self._stages(steps, batch, batch_ids, batch_mask, batch_noise)
            key = jax.device_put(batch_key(seed, start), self._replicated)
            begin = time.perf_counter()
            caption, caption_mask = embed(self.text_encoder.params, batch_ids, batch_mask)
            latents = sampler(self.params, batch_noise, caption, caption_mask, null_caption, key)
            images.append(np.asarray(decode(self._decoder_params, latents))[:n])
            seconds += time.perf_counter() - begin
        if timings is not None:
            timings.update(seconds=seconds, images=len(prompts))
        return np.concatenate(images)


def run_sample_checkpoint(ckpt: PathLike, prompts: Sequence[str], *, out: PathLike, steps: int, seed: int = 0,
                          guidance_scale: float | None = None, force: bool = False, batch_size: int | None = None,
                          text_encoder: TextEncoder | None = None, autoencoder: Autoencoder | None = None,
                          sources: Mapping[str, str] | None = None) -> list[epath.Path]:
    """`s2flash sample --ckpt`: one PNG per prompt, with the prompt and settings in its metadata.

    out: a .png path for a single prompt, else a directory (written whole, or not at all).
    text_encoder / autoencoder: replace the checkpoint's own (see TextToImage.load); sources: where
    they came from, recorded with the settings.
    """
    if steps < 1:
        raise PromptError(f"--steps {steps} must be >= 1")
    out = resolve(out)
    single = out.suffix.lower() == ".png"
    if single and len(prompts) != 1:
        raise PromptError(f"--out {str(out)!r} is one image but {len(prompts)} prompts were given; pass a directory")
    pipeline = TextToImage.load(ckpt, text_encoder=text_encoder, autoencoder=autoencoder)
    if guidance_scale is not None:
        pipeline = dataclasses.replace(pipeline, guidance_scale=guidance_scale)
    if batch_size and pipeline.round_batch_size(batch_size) != batch_size:
        print(f"batch size {batch_size} rounded up to {pipeline.round_batch_size(batch_size)}, a multiple of the "
              f"{jax.device_count()} devices", flush=True)
    batch = pipeline.batch_size_for(len(prompts), batch_size)
    timings: dict[str, float] = {}
    images = pipeline.generate(prompts, steps=steps, seed=seed, batch_size=batch, timings=timings)
    settings = {"checkpoint": str(ckpt), **(sources or {}), "steps": steps, "seed": seed,
                "guidance_scale": pipeline.guidance_scale, "batch_size": batch}
    if single:
        with fresh_output_file(out, force=force) as staging:
            save_png(images[0], staging, prompts[0], {**settings, "index": 0})
        written = [out]
    else:
        with fresh_output_dir(out, force=force) as staging:
            for i, (image, text) in enumerate(zip(images, prompts)):
                save_png(image, staging / f"{i:04d}.png", text, {**settings, "index": i})
        written = [out / f"{i:04d}.png" for i in range(len(prompts))]
    print(f"sampled {len(prompts)} image(s) in {steps} step(s), {timings['seconds']:.2f}s after compilation; "
          f"wrote {out}", flush=True)
    return written


def save_png(image: np.ndarray, path: PathLike, prompt: str, settings: dict) -> None:
    """image [H, W, 3] (or [H, W, 1]: greyscale) in [0, 1] -> a PNG carrying its prompt and
    sampling settings in text chunks."""
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("s2flash", json.dumps(settings))
    pixels = to_uint8(image)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, pnginfo=info)
