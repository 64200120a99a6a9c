"""The numerics policy: which dtype each kind of computation runs in.

Master weights and compute dtype are configurable; the parts that lose
accuracy in low precision are fixed to float32 by the code that computes them
and listed here so there is one place to read them:

- layer/RMS norms (statistics and normalisation; Gemma-2's (1 + weight) scale too),
- the softmax of cross-attention,
- Gemma-2's self-attention logits, their soft cap and softmax,
- the key-value reduction and normaliser of linear attention (the SANA transformer's and the
  DC-AE's multi-scale attention),
- sinusoidal time / guidance features (their argument and their values),
- the model output (velocities leave the network in float32; DC-AE latents and images, and the
  caption embeddings of `CaptionEncoder`, are returned in float32 too).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """param_dtype: dtype of the stored weights; compute_dtype: matmul/activation dtype."""

    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value not in _DTYPES:
                raise ValueError(f"precision.{name}={value!r} is not a dtype; expected one of {sorted(_DTYPES)}")

    @property
    def param(self):
        return _DTYPES[self.param_dtype]

    @property
    def compute(self):
        return _DTYPES[self.compute_dtype]


FP32 = Precision(param_dtype="float32", compute_dtype="float32")


def at_least_fp32(x: jax.Array) -> jax.Array:
    """x in float32, or kept wider (float64 when x64 is on, so derivative checks can use it)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
