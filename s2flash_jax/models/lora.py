"""LoRA adapters of a backbone (its config's lora_rank): which parameters they are, and folding
them into the base weights.

An adapted layer (models/layers.py LoRALinear) holds kernel [in, out], lora_a [in, r] and lora_b
[r, out], each with the leading `layers` axis inside the stacked blocks; it computes
x·(kernel + scale·lora_a·lora_b) + bias, scale = alpha / r.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.backbone import BackboneConfig

# train.trainable pattern that selects exactly the adapters (parameter paths such as
# 'transformer_blocks/attn1/to_q/lora_a'; no other parameter of the model is named lora_*).
ADAPTER_PATTERN = "*/lora_[ab]"
ADAPTER_NAMES = ("lora_a", "lora_b")


def without_adapters(config: BackboneConfig) -> BackboneConfig:
    """`config` with every LoRA key (its class's LORA_KEYS) at its default: the architecture of the
    merged model."""
    keys = type(config).LORA_KEYS
    return dataclasses.replace(config, **{f.name: f.default for f in dataclasses.fields(config) if f.name in keys})


def folded_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """kernel [..., in, out] + scale·lora_a [..., in, r] @ lora_b [..., r, out], summed in float32 and
    returned in kernel's dtype (leading axes, e.g. `layers`, are batch axes)."""
    update = jnp.einsum("...ir,...ro->...io", jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32))
    return (jnp.asarray(kernel, jnp.float32) + scale * update).astype(kernel.dtype)


def merge_lora(config: BackboneConfig, params: nnx.State) -> tuple[BackboneConfig, nnx.State]:
    """Fold every adapter into its base kernel: (the config without adapters, its parameters).

    params: the nnx.Param state of the backbone built from `config` (e.g. nnx.state(model) or a
    train state's student). The merged model computes what the adapted one does, up to rounding.
    A config without adapters is returned as it is, with its params.
    """
    if config.lora is None:
        return config, params
    flat = dict(nnx.to_flat_state(params))
    layers = sorted({path[:-1] for path in flat if path[-1] in ADAPTER_NAMES})
    if len(layers) != len(config.lora_layers):
        found = ["/".join(map(str, layer)) for layer in layers]
        raise ValueError(f"params hold adapters on {found}, but the config adapts {list(config.lora_layers)} "
                         f"(lora_rank={config.lora_rank}, lora_targets={config.lora_targets})")
    for layer in layers:
        kernel = flat[(*layer, "kernel")]
        a, b = (flat.pop((*layer, name)).get_value() for name in ADAPTER_NAMES)
        flat[(*layer, "kernel")] = kernel.replace(folded_kernel(kernel.get_value(), a, b, config.lora.scale))
    return without_adapters(config), nnx.from_flat_state(list(flat.items()))
