"""CLIP score in JAX: transformers' `CLIPModel` (text and vision towers, projections) in Flax NNX.

Why a port rather than running CLIP at the torch boundary: the model is a plain pre-norm
transformer twice over (~430M parameters for ViT-L/14, the CLIP most T2I papers score with), small
enough to keep exact, and it then runs on the same devices and in the same jitted batches as
generation. Numerics follow `transformers/models/clip/modeling_clip.py` (5.23):
  - text: token + learned position embeddings, causal self-attention (padding after the end token
    cannot reach it), final LayerNorm, the end token's state pooled (`eos_token_id == 2` in old
    configs means "argmax of the ids", as transformers keeps for them), `text_projection`;
  - vision: a patch x patch stride-patch conv without bias (a dense layer over flattened patches
    here, NHWC), a class token, learned positions, `pre_layrnorm`, the encoder, `post_layernorm`
    of the class token, `visual_projection`;
  - encoder layers: LayerNorm -> attention (scale head_dim^-½, softmax in float32) -> residual,
    LayerNorm -> fc1 -> activation (`quick_gelu` x·σ(1.702x) for OpenAI's CLIPs) -> fc2 -> residual.

CLIP score (Hessel et al.; torchmetrics' `CLIPScore`, as T2I papers report it): for each image and
its own prompt, 100 · max(cos(image embedding, text embedding), 0), averaged over images. Images
reach the vision tower as `CLIPImageProcessor` makes them: quantised to uint8, the shortest side
resized to `size` with PIL's bicubic filter, centre-cropped, scaled to [0, 1], normalised by the
processor's mean and std. Text: the tokenizer's tokenizer.json (read by the `tokenizers` library,
no transformers), truncated to max_position_embeddings tokens keeping the end token.

`conversion/clip.py` reads a transformers CLIP folder (config.json, model.safetensors,
tokenizer.json, preprocessor_config.json) into a `ClipScorer` without torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from s2flash_jax.data.captions import FastTokenizer
from s2flash_jax.outputs import to_uint8
from s2flash_jax.models.layers import LayerNorm, dense
from s2flash_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, padded_batches
from s2flash_jax.precision import FP32, Precision

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers' PR #24773: pool at the argmax id instead
CLIP_SCORE_WEIGHT = 100.0
# OpenAI CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / _STD): the processor's defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
    """The transformers `CLIPTextConfig` / `CLIPVisionConfig` fields that shape the outputs (defaults:
    transformers' defaults, ViT-B/32). Text-only: vocab_size, max_position_embeddings, eos_token_id;
    vision-only: image_size, patch_size, num_channels."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    def __post_init__(self):
        problems = [f"{key}={getattr(self, key)} must be >= 1" for key in
                    ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
                    if getattr(self, key) < 1]
        if self.hidden_size % max(self.num_attention_heads, 1):
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                            f"{self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if self.image_size % max(self.patch_size, 1):
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if problems:
            raise ValueError("invalid CLIP config: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTowerConfig = CLIPTowerConfig(hidden_size=512, intermediate_size=2048)
    vision: CLIPTowerConfig = CLIPTowerConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    projection_dim: int = 512

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPConfig:
        """From a transformers CLIPModel config.json dict; keys for training or generation are ignored."""
        if config.get("model_type", "clip") != "clip":
            raise ValueError(f"model_type={config['model_type']!r}: expected a 'clip' config (a CLIPModel)")
        fields = {f.name for f in dataclasses.fields(CLIPTowerConfig)}
        defaults = cls()

        def tower(values: Mapping[str, Any] | None, default: CLIPTowerConfig) -> CLIPTowerConfig:
            chosen = {k: v for k, v in (values or {}).items() if k in fields and v is not None}
            return dataclasses.replace(default, **chosen)

        return cls(text=tower(config.get("text_config"), defaults.text),
                   vision=tower(config.get("vision_config"), defaults.vision),
                   projection_dim=config.get("projection_dim", defaults.projection_dim))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biases. x [B, T, D], additive bias [B or 1, 1, T, T] or None -> [B, T, D]."""

    def __init__(self, config: CLIPTowerConfig, *, precision: Precision, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (d // self.num_heads) ** -0.5
        self.k_proj, self.v_proj, self.q_proj = (dense(d, d, ("embed", "heads"), precision=precision, rngs=rngs)
                                                 for _ in range(3))
        self.out_proj = dense(d, d, ("heads", "embed"), precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        def heads(y):
            return y.reshape(y.shape[:2] + (self.num_heads, -1))

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out_proj(out.reshape(x.shape[:2] + (-1,)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer. x [B, T, D] -> [B, T, D]."""

    def __init__(self, config: CLIPTowerConfig, *, precision: Precision, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, precision=precision, rngs=rngs)
        self.layer_norm1 = LayerNorm(d, eps=eps, affine=True, precision=precision)
        self.layer_norm2 = LayerNorm(d, eps=eps, affine=True, precision=precision)
        self.fc1 = dense(d, config.intermediate_size, ("embed", "mlp"), precision=precision, rngs=rngs)
        self.fc2 = dense(config.intermediate_size, d, ("mlp", "embed"), precision=precision, rngs=rngs)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.compute = precision.compute

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x).astype(self.compute), bias)
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x).astype(self.compute))))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTowerConfig, *, precision: Precision, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, precision=precision, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPTextTransformer(nnx.Module):
    """ids [B, T] (T <= max_position_embeddings), mask [B, T] -> pooled end-token state [B, D] (float32)."""

    def __init__(self, config: CLIPTowerConfig, *, precision: Precision, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.token_embedding = nnx.Embed(config.vocab_size, d, param_dtype=precision.param, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, param_dtype=precision.param, rngs=rngs)
        self.encoder = CLIPEncoder(config, precision=precision, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, eps=config.layer_norm_eps, affine=True, precision=precision)
        self.compute = precision.compute

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        length = ids.shape[1]
        x = (self.token_embedding(ids) + self.position_embedding(jnp.arange(length))[None]).astype(self.compute)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None] & (mask[:, None, :] > 0)  # [B, T, T]
        # transformers adds finfo.min where a key is not allowed; so do we, in float32.
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]
        x = self.final_layer_norm(self.encoder(x, bias))
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            end = jnp.argmax(ids, axis=-1)
        else:
            end = jnp.argmax(ids == self.config.eos_token_id, axis=-1)  # the first end token
        return x[jnp.arange(x.shape[0]), end]


class CLIPVisionTransformer(nnx.Module):
    """pixel values [B, S, S, C] (normalised, S = image_size) -> pooled class-token state [B, D] (float32)."""

    def __init__(self, config: CLIPTowerConfig, *, precision: Precision, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.config = config
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), precision.param))
        # The stride-p conv as a dense layer over flattened (p, p, C) patches (kernel [(p p C), D]).
        self.patch_embedding = dense(p * p * config.num_channels, d, ("patch_in", "embed"), use_bias=False,
                                     precision=precision, rngs=rngs)
        self.position_embedding = nnx.Embed((config.image_size // p) ** 2 + 1, d, param_dtype=precision.param,
                                            rngs=rngs)
        self.pre_layrnorm = LayerNorm(d, eps=config.layer_norm_eps, affine=True, precision=precision)
        self.encoder = CLIPEncoder(config, precision=precision, rngs=rngs)
        self.post_layernorm = LayerNorm(d, eps=config.layer_norm_eps, affine=True, precision=precision)
        self.compute = precision.compute

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, s, p = pixels.shape[0], self.config.image_size, self.config.patch_size
        if pixels.shape[1:3] != (s, s):
            raise ValueError(f"CLIP's vision tower takes {s}x{s} images, got {pixels.shape[1:3]}")
        patches = pixels.reshape(b, s // p, p, s // p, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, (s // p) ** 2, -1)
        x = self.patch_embedding(patches.astype(self.compute))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(jnp.arange(x.shape[1] + 1))[None]
        x = self.encoder(self.pre_layrnorm(x).astype(self.compute))
        return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    """transformers' CLIPModel without its logit scale: `text_embeds(ids, mask)` [B, P] and
    `image_embeds(pixels)` [B, P], both projected (not normalised), float32."""

    def __init__(self, config: CLIPConfig, *, precision: Precision = FP32, rngs: nnx.Rngs):
        self.config = config
        with nnx.use_eager_sharding(False):  # logical names only; the scorer replicates the weights
            self.text_model = CLIPTextTransformer(config.text, precision=precision, rngs=rngs)
            self.vision_model = CLIPVisionTransformer(config.vision, precision=precision, rngs=rngs)
            self.text_projection = dense(config.text.hidden_size, config.projection_dim, ("embed", "embed"),
                                         use_bias=False, precision=precision, rngs=rngs)
            self.visual_projection = dense(config.vision.hidden_size, config.projection_dim, ("embed", "embed"),
                                           use_bias=False, precision=precision, rngs=rngs)

    def text_embeds(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.text_projection(self.text_model(ids, mask)).astype(jnp.float32)

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """100 · max(cos, 0) of each image with its own prompt: [B, P], [B, P] -> [B]."""
    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    return CLIP_SCORE_WEIGHT * jnp.maximum(jnp.sum(unit(image_embeds) * unit(text_embeds), axis=-1), 0.0)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """CLIPImageProcessor's settings (preprocessor_config.json): shortest side -> size (PIL bicubic),
    centre crop crop_size x crop_size, x/255, (x − mean) / std."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image [H, W, 3] (uint8, or floats in [0, 1]) -> float32 [crop_size, crop_size, 3]."""
        u8 = image if image.dtype == np.uint8 else to_uint8(image)
        height, width = u8.shape[:2]
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_height, new_width = (new_short, new_long) if height <= width else (new_long, new_short)
        resized = np.asarray(Image.fromarray(u8).resize((new_width, new_height), resample=Image.Resampling.BICUBIC))
        top, left = (new_height - self.crop_size) // 2, (new_width - self.crop_size) // 2
        if top < 0 or left < 0:
            raise ValueError(f"CLIP preprocessing: size {self.size} is smaller than crop_size {self.crop_size}")
        cropped = resized[top:top + self.crop_size, left:left + self.crop_size].astype(np.float32) * np.float32(1 / 255)
        return ((cropped - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)


@dataclasses.dataclass
class ClipScorer:
    """CLIP score of (image, prompt) pairs, batched and split over every local device.

    model: the CLIP; tokenizer: its tokenizer.json (see `conversion.clip.load_clip_scorer`);
    preprocessing: its image processor's settings; batch_size: pairs per compiled batch (rounded
    up to a multiple of the device count, the last batch padded: `padded_batches`).
    """

    model: CLIPModel
    tokenizer: FastTokenizer
    preprocessing: ImagePreprocessing = ImagePreprocessing()
    batch_size: int = 64

    def __post_init__(self):
        self._mesh = make_mesh(MeshConfig(data=-1))
        self.batch_size = -(-self.batch_size // self._mesh.size) * self._mesh.size
        self._sharded = batch_sharding(self._mesh)
        graphdef, state = nnx.split(self.model)
        self._state = jax.device_put(state, NamedSharding(self._mesh, PartitionSpec()))

        def scores(state, pixels, ids, mask):
            model = nnx.merge(graphdef, state)
            return clip_score(model.image_embeds(pixels), model.text_embeds(ids, mask))

        self._scores = jax.jit(scores, in_shardings=(None, self._sharded, self._sharded, self._sharded),
                               out_shardings=self._sharded)

    @property
    def max_length(self) -> int:
        return self.model.config.text.max_position_embeddings

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 [N, max_length]: padded to the model's length, longer prompts truncated
        keeping the end token, as CLIPTokenizer(padding="max_length", truncation=True) gives."""
        encoded = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """images [N, H, W, 3] -> float32 [N, crop, crop, 3] (`ImagePreprocessing`)."""
        return np.stack([self.preprocessing(image) for image in np.asarray(images)])

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """CLIP score of image i with prompt i: float32 [N]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not len(prompts):
            return np.zeros((0,), np.float32)
        batches = padded_batches([self.pixels(images), *self.tokenize(prompts)], self.batch_size, self._mesh.size)
        return np.concatenate([np.asarray(self._scores(self._state, *(jax.device_put(x, self._sharded) for x in batch)))
                               [:count] for batch, count in batches])
