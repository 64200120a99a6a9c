"""Small building blocks shared by the models, each parameter named by logical axes.

Logical axis names (mapped to mesh axes by `s2flash_jax.parallel.axes`):
  embed      the model width D (the transformer's, Gemma-2's hidden size, a DC-AE stage's channels)
  heads      attention inner width (heads x head_dim; Gemma-2's query heads)
  kv_heads   Gemma-2's grouped key/value projections (kv heads x head_dim)
  vocab      the rows of a token embedding table (Gemma-2)
  mlp        hidden width of MLPs and of the Mix-FFN
  caption    width of the text-encoder features fed to the caption projection
  time_freq  width of the sinusoidal time features
  adaln      the 6·D adaLN-single modulation vector
  patch_in / patch_out   flattened patch (p·p·C) at the input / output
  table      the rows of a modulation table (6 or 2)
  conv_window            spatial and per-group input axes of a depthwise kernel
  scalar     a width-1 output (the logvar head)
  lora       the rank of a LoRA adapter (A [in, r], B [r, out]); small, never sharded
  layers     the stacked-layer axis added by the layer scan (`stacked`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from s2flash_jax.models.depthwise import depthwise_conv
from s2flash_jax.precision import Precision

M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class LoRA:
    """A low-rank adapter: rank r, and the update's scale alpha / r (PEFT's `lora_alpha`)."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# PEFT's init of lora_A: torch nn.Linear's kaiming_uniform_(a=√5), i.e. U(±1/√fan_in), fan_in = the input width.
LORA_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoRALinear(nnx.Linear):
    """A Linear plus a low-rank update: y = x·W + b + (alpha/r)·(x·A)·B.

    A [in, r] starts as PEFT's lora_A, B [r, out] at zero, so the layer computes exactly the Linear
    until B trains. The update is two plain matmuls in the compute dtype (jax.jvp goes through).
    models/lora.py folds it into `kernel`.
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], lora: LoRA, *,
                 rngs: nnx.Rngs, **linear_kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self.lora_scale = lora.scale
        param_dtype = linear_kwargs["param_dtype"]
        self.lora_a = nnx.Param(LORA_A_INIT(rngs.params(), (in_features, lora.rank), param_dtype),
                                out_sharding=(axes[0], "lora"))
        self.lora_b = nnx.Param(jnp.zeros((lora.rank, out_features), param_dtype), out_sharding=("lora", axes[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
        down = jnp.einsum("...i,ir->...r", x.astype(y.dtype), a)
        return y + self.lora_scale * jnp.einsum("...r,ro->...o", down, b)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    *,
    precision: Precision,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    kernel_init=nnx.initializers.lecun_normal(),
    lora: LoRA | None = None,
) -> nnx.Linear:
    """A Linear whose kernel [in, out] carries `axes` and whose bias [out] carries `axes[1]`; with
    `lora`, a LoRALinear whose adapters carry (axes[0], "lora") and ("lora", axes[1])."""
    linear_kwargs = {
        "use_bias": use_bias,
        "dtype": precision.compute,
        "param_dtype": precision.param,
        "kernel_init": nnx.with_partitioning(kernel_init, axes),
        "bias_init": nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        "rngs": rngs,
    }
    if lora is None:
        return nnx.Linear(in_features, out_features, **linear_kwargs)
    return LoRALinear(in_features, out_features, axes, lora, **linear_kwargs)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32. x: [..., D] -> float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale; statistics in float32.

    x: [..., D] -> [..., D] in `out_dtype` (the compute dtype).
    """

    def __init__(self, dim: int, axis_name: str, *, eps: float, precision: Precision):
        self.eps = eps
        self.out_dtype = precision.compute
        self.weight = nnx.Param(jnp.ones((dim,), precision.param), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.weight[...].astype(jnp.float32)).astype(self.out_dtype)


def modulate(x_normed: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation in float32: x·(1 + scale) + shift. x: [B, N, D], shift/scale: [B, 1, D]."""
    return x_normed * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, optionally with learned weight and bias, statistics in float32.

    x: [..., D] -> float32 [..., D]
    """

    def __init__(self, dim: int, *, eps: float, affine: bool, precision: Precision):
        self.eps = eps
        if affine:
            self.weight = nnx.Param(jnp.ones((dim,), precision.param), out_sharding=("embed",))
            self.bias = nnx.Param(jnp.zeros((dim,), precision.param), out_sharding=("embed",))
        else:
            self.weight = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y


class DepthwiseConv(nnx.Module):
    """Depthwise k x k convolution, stride 1, zero 'same' padding, with bias (models/depthwise.py says
    how it is computed). Kernel layout is HWIO [k, k, 1, C], as a grouped conv's.
    x: [B, H, W, C] -> [B, H, W, C]
    """

    def __init__(self, channels: int, kernel_size: int, *, precision: Precision, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels), precision.param),
                                out_sharding=("conv_window", "conv_window", "conv_window", "mlp"))
        self.bias = nnx.Param(jnp.zeros((channels,), precision.param), out_sharding=("mlp",))
        self.compute_dtype = precision.compute

    def __call__(self, x: jax.Array) -> jax.Array:
        out = depthwise_conv(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
        return out + self.bias[...].astype(self.compute_dtype)


def stacked(make: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """`count` modules `make(rngs)`, each with its own random init, as one module whose parameters
    are stacked on a leading axis named `layers`: what a `jax.lax.scan` over layers runs."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)

    return build(rngs)
