"""Gemma-2, SANA's text encoder, in Flax NNX: transformers' `Gemma2Model` (last_hidden_state, no LM head).

Port, not a library: Google DeepMind's `gemma` package (3.3.0) leaves jax/flax unpinned, so it
would install, but it is a Flax *linen* model (our models are NNX, split/merged at the jit boundary),
pulls in `kauldron` and sentencepiece, loads its own orbax checkpoints rather than a transformers
folder (a key table would be needed anyway), offers `query_pre_attn_norm` only as a fixed enum and
builds masks/positions its own way, so matching transformers' padding semantics would mean
re-deriving them around it. A small port with logical axis names is the shorter road.

Numerics follow `transformers/models/gemma2/modeling_gemma2.py` (5.23):
  - token embedding x sqrt(hidden_size), the normaliser rounded to the compute dtype first
    (transformers rounds it to the weights' dtype: sqrt(3072) becomes 55.5 in bf16);
  - RMSNorm with a (1 + weight) scale, statistics and scaling in float32, output in the input dtype;
  - GQA attention scaled by query_pre_attn_scalar**-0.5, logits soft-capped by
    attn_logit_softcapping·tanh(logits / cap), rotary embeddings on q and k; logits, cap and
    softmax in float32 (transformers keeps the logits in the compute dtype: same in float32);
  - per-layer `layer_types`: "sliding_attention" layers see keys with q - sliding_window < kv <= q,
    "full_attention" layers all kv <= q; keys where attention_mask is 0 are not seen (but see below);
  - sandwich norms (input / post-attention / pre-feed-forward / post-feed-forward) and a GeGLU MLP.
Positions are 0..L-1 whatever the mask (transformers' default position_ids), so right padding (as
SANA uses) leaves the real tokens exactly as without padding. Padded query rows are computed too, as
transformers' eager attention computes them: they attend to the earlier real tokens, and a row that
sees no key at all (a padded row further than sliding_window past the last real token) averages
every value uniformly, because a float32-min fill (transformers adds finfo.min) makes all its logits
equal.

`CaptionEncoder` wraps a tokenizer (transformers', or the torch-free `data.captions.FastTokenizer`)
and this model into SANA's caption embedding, token for token what `data.precompute.embed_captions`
does with the torch model (both use `data.captions.tokenize_captions`); it is also the text encoder
of `pipeline.TextToImage` for `s2flash sample --text-encoder`. Loading from a transformers checkpoint
folder: `conversion/gemma2.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2flash_jax.data.captions import (SANA_CHI_PROMPT, CaptionTokens, diffusers_prompt, kept_positions,
                                       tokenize_captions)
from s2flash_jax.models.layers import dense, stacked
from s2flash_jax.precision import Precision

SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}  # transformers' name -> tanh approximation?
# config.json keys that would change the model but that the port does not implement: key -> allowed values
_UNSUPPORTED = {"use_bidirectional_attention": (None, False), "rope_scaling": (None,)}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """The transformers `Gemma2Config` fields that shape the hidden states (defaults: Gemma-2-2B, SANA's).

    layer_types: one of "sliding_attention" / "full_attention" per layer; None gives transformers'
    default, sliding on even layers (0, 2, ...) and full on odd ones.
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = 50.0

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types",
                               tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be >= 1")
        if self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)")
        if self.hidden_activation not in ACTIVATIONS:
            problems.append(f"hidden_activation={self.hidden_activation!r} is not supported; expected one of "
                            f"{sorted(ACTIVATIONS)}")
        bad_types = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad_types:
            problems.append(f"layer_types {bad_types} are not supported; expected {SLIDING!r} or {FULL!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for num_hidden_layers="
                            f"{self.num_hidden_layers}")
        if SLIDING in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            problems.append(f"sliding_window={self.sliding_window} must be >= 1 when a layer is {SLIDING!r}")
        for key in ("query_pre_attn_scalar", "rope_theta", "rms_norm_eps"):
            if not getattr(self, key) > 0:
                problems.append(f"{key}={getattr(self, key)} must be > 0")
        if self.attn_logit_softcapping is not None and not self.attn_logit_softcapping > 0:
            problems.append(f"attn_logit_softcapping={self.attn_logit_softcapping} must be > 0 or None")
        if problems:
            raise ValueError("invalid Gemma2Config: " + "; ".join(problems))

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> Gemma2Config:
        """From a transformers `config.json` dict (of a Gemma2Model or Gemma2ForCausalLM).

        Keys that only concern generation or training (token ids, final_logit_softcapping, dropout,
        max_position_embeddings, ...) are ignored; values the port does not implement are a ValueError.
        """
        if config.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"model_type={config['model_type']!r}: expected a 'gemma2' config")
        problems = [f"{key}={config[key]!r} is not supported (expected {' or '.join(map(repr, allowed))})"
                    for key, allowed in _UNSUPPORTED.items() if config.get(key) not in allowed]
        # transformers >= 5 nests rope_theta in rope_parameters; older configs have it at the top level.
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_parameters.rope_type={rope['rope_type']!r} is not supported (expected 'default')")
        if problems:
            raise ValueError("unsupported Gemma-2 config: " + "; ".join(problems))
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in fields}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)

    @property
    def sliding_layers(self) -> np.ndarray:
        """bool [num_hidden_layers]: which layers use the sliding window."""
        return np.array([t == SLIDING for t in self.layer_types])


class Gemma2RMSNorm(nnx.Module):
    """x·rsqrt(mean(x²) + eps)·(1 + weight), all in float32; the weight starts at 0 (identity).

    x: [..., D] -> [..., D] in x's dtype
    """

    def __init__(self, dim: int, *, eps: float, precision: Precision):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), precision.param), out_sharding=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [length, head_dim] for positions 0..length-1: frequencies theta^(-2i/head_dim),
    each repeated for both halves (transformers' rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [-x₂, x₁] of x's two halves.

    x: [B, L, ..., head_dim]; cos, sin: [L, head_dim] (already in x's dtype) -> like x
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    extra = (None,) * (x.ndim - 3)  # broadcast over the head axes
    index = (None, slice(None), *extra, slice(None))
    return x * cos[index] + jnp.concatenate([-x2, x1], axis=-1) * sin[index]


class Gemma2Attention(nnx.Module):
    """Causal GQA self-attention with rotary positions and soft-capped logits.

    x: [B, L, D], cos/sin: [L, head_dim], mask: bool [B, L, L] (query, key; True = may attend) -> [B, L, D]
    """

    def __init__(self, config: Gemma2Config, *, precision: Precision, rngs: nnx.Rngs):
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.scaling = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping
        q_width, kv_width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim

        def proj(in_dim: int, out_dim: int, axes: tuple[str, str]) -> nnx.Linear:
            return dense(in_dim, out_dim, axes, use_bias=config.attention_bias, precision=precision, rngs=rngs,
                         kernel_init=nnx.initializers.normal(0.02))

        self.q_proj = proj(config.hidden_size, q_width, ("embed", "heads"))
        self.k_proj = proj(config.hidden_size, kv_width, ("embed", "kv_heads"))
        self.v_proj = proj(config.hidden_size, kv_width, ("embed", "kv_heads"))
        self.o_proj = proj(q_width, config.hidden_size, ("heads", "embed"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        # Query heads grouped by the key/value head they share: head h uses kv head h // group (repeat_kv).
        q = einops.rearrange(self.q_proj(x), "b l (k g d) -> b l k g d", k=self.kv_heads, d=self.head_dim)
        k = einops.rearrange(self.k_proj(x), "b l (k d) -> b l k d", d=self.head_dim)
        v = einops.rearrange(self.v_proj(x), "b l (k d) -> b l k d", d=self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        logits = jnp.einsum("blkgd,bmkd->bkglm", q, k, preferred_element_type=jnp.float32) * self.scaling
        if self.softcap is not None:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        # finfo.min, not -inf: a row with no visible key then averages all values, as transformers' does.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkglm,bmkd->blkgd", weights, v)
        return self.o_proj(einops.rearrange(out, "b l k g d -> b l (k g d)"))


class Gemma2MLP(nnx.Module):
    """GeGLU: down(gelu(gate(x)) · up(x)). x: [B, L, D] -> [B, L, D]"""

    def __init__(self, config: Gemma2Config, *, precision: Precision, rngs: nnx.Rngs):
        self.approximate = ACTIVATIONS[config.hidden_activation]
        init = nnx.initializers.normal(0.02)
        width, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = dense(width, hidden, ("embed", "mlp"), use_bias=False, precision=precision, rngs=rngs,
                               kernel_init=init)
        self.up_proj = dense(width, hidden, ("embed", "mlp"), use_bias=False, precision=precision, rngs=rngs,
                             kernel_init=init)
        self.down_proj = dense(hidden, width, ("mlp", "embed"), use_bias=False, precision=precision, rngs=rngs,
                               kernel_init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class Gemma2DecoderLayer(nnx.Module):
    """Sandwich-normed attention and MLP residual branches. h: [B, L, D] -> [B, L, D]"""

    def __init__(self, config: Gemma2Config, *, precision: Precision, rngs: nnx.Rngs):
        def norm() -> Gemma2RMSNorm:
            return Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps, precision=precision)

        self.self_attn = Gemma2Attention(config, precision=precision, rngs=rngs)
        self.mlp = Gemma2MLP(config, precision=precision, rngs=rngs)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2Model(nnx.Module):
    """transformers' Gemma2Model: token ids -> last hidden state (after the final norm).

    Layers are stacked on a leading `layers` axis and run with a scan (one compiled layer); each
    layer's sliding/full choice is data of the scan. Parameter paths mirror transformers' keys
    (`layers/self_attn/q_proj/kernel` <- `layers.{i}.self_attn.q_proj.weight`).

    __call__(input_ids, attention_mask=None) -> [B, L, hidden_size] in the compute dtype
      input_ids: int [B, L]; attention_mask: [B, L], 1 = token, 0 = padding (None: all tokens)
    """

    def __init__(self, config: Gemma2Config, *, precision: Precision = Precision(), rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        with nnx.use_eager_sharding(False):  # logical names only; parallel/ places them on a mesh
            self.embed_tokens = nnx.Embed(
                config.vocab_size, config.hidden_size, dtype=precision.compute, param_dtype=precision.param,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
            self.layers = stacked(lambda r: Gemma2DecoderLayer(config, precision=precision, rngs=r),
                                  config.num_hidden_layers, rngs)
            self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps, precision=precision)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or (attention_mask is not None and np.shape(attention_mask) != input_ids.shape):
            raise ValueError(f"input_ids {input_ids.shape} and attention_mask "
                             f"{None if attention_mask is None else np.shape(attention_mask)} must both be [B, L]")
        cfg, compute = self.config, self.precision.compute
        length = input_ids.shape[1]
        tokens = (jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) > 0)

        h = self.embed_tokens(input_ids) * jnp.asarray(cfg.hidden_size ** 0.5, compute)
        cos, sin = (jnp.asarray(t, compute) for t in rotary_tables(length, cfg.head_dim, cfg.rope_theta))
        query, key = np.arange(length)[:, None], np.arange(length)[None, :]
        full = jnp.asarray(key <= query)[None] & tokens[:, None, :]  # [B, L, L]: causal, real keys only
        window = cfg.sliding_window or length
        sliding = full & jnp.asarray(key > query - window)[None]

        graphdef, layers = nnx.split(self.layers)

        def run_layer(h, layer):
            state, is_sliding = layer
            return nnx.merge(graphdef, state)(h, cos, sin, jnp.where(is_sliding, sliding, full)), None

        h, _ = jax.lax.scan(run_layer, h, (layers, jnp.asarray(cfg.sliding_layers)))
        return self.norm(h)



class CaptionEncoder:
    """SANA's caption embedding in JAX: captions -> (embeddings float32 [B, L, D], mask int64 [B, L]),
    L = caption_length, as `data.precompute.embed_captions` returns them from the torch model.

    tokenizer: a transformers tokenizer or a `data.captions.FastTokenizer` of a Gemma-2 folder;
    chi_prompt: SANA's complex human instruction, or None; lowercase: lowercase and strip each caption
    first, as diffusers' pipelines do at sampling time (`data.captions.diffusers_prompt`; training
    captions are encoded as written). One compilation per batch size (the token length is fixed).

    As a text encoder of `pipeline.TextToImage`: `tokenize` (host) then `embed(params, ...)` (pure,
    jittable), `params` the Gemma-2 state (the encoder keeps no other reference to the weights).
    """

    def __init__(self, tokenizer: Any, model: Gemma2Model, *, caption_length: int = 300,
                 chi_prompt: str | None = SANA_CHI_PROMPT, lowercase: bool = False):
        self.tokenizer, self.config = tokenizer, model.config
        self.caption_length, self.chi_prompt, self.lowercase = caption_length, chi_prompt, lowercase
        self.graphdef, self.params = nnx.split(model)
        self._embed = jax.jit(self.embed)

    @property
    def model(self) -> Gemma2Model:
        return nnx.merge(self.graphdef, self.params)

    @property
    def width(self) -> int:
        """D, the width of the embeddings."""
        return self.config.hidden_size

    def _tokens(self, captions: Sequence[str]) -> CaptionTokens:
        if self.lowercase and not isinstance(captions, str):
            captions = [diffusers_prompt(c) for c in captions]
        return tokenize_captions(self.tokenizer, captions, self.caption_length, self.chi_prompt)

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (ids, mask) int32 [B, T], what Gemma-2 reads (T: see `tokenize_captions`).
        Warns (CaptionTruncatedWarning) for each caption cut to fit."""
        tokens = self._tokens(captions)
        return tokens.input_ids.astype(np.int32), tokens.attention_mask.astype(np.int32)

    def embed(self, params: nnx.State, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pure: (ids, mask) [B, T] -> (embeddings float32 [B, L, D], mask [B, L]) at SANA's kept positions."""
        keep = np.asarray(kept_positions(ids.shape[1], self.caption_length))
        hidden = nnx.merge(self.graphdef, params)(ids, mask).astype(jnp.float32)
        return hidden[:, keep], mask[:, keep]

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self._tokens(captions)
        hidden, _ = self._embed(self.params, tokens.input_ids.astype(np.int32), tokens.attention_mask.astype(np.int32))
        return np.asarray(hidden), tokens.kept_mask
