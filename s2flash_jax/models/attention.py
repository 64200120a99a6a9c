"""SANA's two attentions: ReLU linear self-attention and softmax cross-attention.

Both are plain XLA einsums so that `jax.jvp` (the sCM tangent) goes through them.
"""

from __future__ import annotations

from collections.abc import Mapping

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.layers import LoRA, RMSNorm, dense
from s2flash_jax.precision import Precision

# diffusers turns the 0/1 text mask into this additive bias (not -inf), so fully padded rows
# still average over all tokens; kept for parity.
MASK_BIAS = -10000.0
QK_NORM_EPS = 1e-5


class _Projections(nnx.Module):
    """q from the queries' stream, k/v from the context stream, optional RMSNorm over all heads, output.

    adapters: LoRA adapters by diffusers' module name ("to_q", "to_k", "to_v", "to_out.0").
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        inner_dim: int,
        *,
        qkv_bias: bool,
        qk_norm: bool,
        precision: Precision,
        rngs: nnx.Rngs,
        adapters: Mapping[str, LoRA],
    ):
        def proj(in_dim: int, name: str) -> nnx.Linear:
            return dense(in_dim, inner_dim, ("embed", "heads"), use_bias=qkv_bias, precision=precision, rngs=rngs,
                         lora=adapters.get(name))

        self.to_q = proj(query_dim, "to_q")
        self.to_k = proj(context_dim, "to_k")
        self.to_v = proj(context_dim, "to_v")
        if qk_norm:
            self.norm_q = RMSNorm(inner_dim, "heads", eps=QK_NORM_EPS, precision=precision)
            self.norm_k = RMSNorm(inner_dim, "heads", eps=QK_NORM_EPS, precision=precision)
        else:
            self.norm_q = self.norm_k = None
        self.to_out = dense(inner_dim, query_dim, ("heads", "embed"), precision=precision, rngs=rngs,
                            lora=adapters.get("to_out.0"))

    def qkv(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v


class LinearSelfAttention(_Projections):
    """ReLU-kernel linear attention, O(N) in tokens.

    out_i = Σ_j v_j·(φ(k_j)·φ(q_i)) / (Σ_j φ(k_j)·φ(q_i) + eps), φ = ReLU, per head, in float32
    (bf16 sums over thousands of tokens lose the normaliser).
    x: [B, N, D] -> [B, N, D]
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, bias: bool, qk_norm: bool, eps: float,
                 precision: Precision, rngs: nnx.Rngs, adapters: Mapping[str, LoRA]):
        super().__init__(dim, dim, heads * head_dim, qkv_bias=bias, qk_norm=qk_norm, precision=precision, rngs=rngs,
                         adapters=adapters)
        self.heads = heads
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.qkv(x, x)
        q, k, v = (einops.rearrange(a, "b n (h d) -> b n h d", h=self.heads).astype(jnp.float32) for a in (q, k, v))
        q, k = jax.nn.relu(q), jax.nn.relu(k)
        kv = jnp.einsum("bnhd,bnhe->bhde", k, v)
        numerator = jnp.einsum("bnhd,bhde->bnhe", q, kv)
        denominator = jnp.einsum("bnhd,bhd->bnh", q, jnp.sum(k, axis=1))
        out = numerator / (denominator[..., None] + self.eps)
        out = einops.rearrange(out, "b n h e -> b n (h e)").astype(x.dtype)
        return self.to_out(out)


class CrossAttention(_Projections):
    """Softmax attention from image tokens to caption tokens (logits and softmax in float32).

    x: [B, N, D], context: [B, L, Dc], mask: [B, L] (1 keep, 0 padding) or None -> [B, N, D]
    """

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, *, qk_norm: bool,
                 precision: Precision, rngs: nnx.Rngs, adapters: Mapping[str, LoRA]):
        super().__init__(dim, context_dim, heads * head_dim, qkv_bias=True, qk_norm=qk_norm, precision=precision,
                         rngs=rngs, adapters=adapters)
        self.heads = heads
        self.head_dim = head_dim

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        q, k, v = self.qkv(x, context)
        q, k, v = (einops.rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))
        logits = jnp.einsum("bhnd,bhld->bhnl", q, k, preferred_element_type=jnp.float32)
        logits = logits * (self.head_dim**-0.5)
        if mask is not None:
            logits = logits + (1.0 - mask.astype(jnp.float32))[:, None, None, :] * MASK_BIAS
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = einops.rearrange(jnp.einsum("bhnl,bhld->bhnd", weights, v), "b h n d -> b n (h d)")
        return self.to_out(out)
