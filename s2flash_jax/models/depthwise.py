"""Depthwise k x k convolution (stride 1, zero 'same' padding) as one primitive with its own transpose.

x: [B, H, W, C], kernel: [k, k, 1, C] (HWIO, as a grouped conv's) -> [B, H, W, C]

Why a primitive: the forward is a sum of k·k shifted, per-channel-scaled copies of the input
(XLA:CPU runs a grouped `conv_general_dilated` with thousands of groups ~35x slower, and on
accelerators this form is as memory-bound as the conv). Autodiff of that sum transposes each shift
into a pad of the full padded image, and XLA:CPU turns those into slow pad/slice fusions: 20% of the
shapes teacher's step. Here the input gradient is the same shifted sum with the kernel flipped
(2.6 ms against ~60 ms at [32, 16, 16, 320]) and the kernel gradient one reduction per tap in a loop
(unrolled, XLA:CPU fuses the k·k reductions ~5x slower). The op is bilinear, so forward-mode
(sCM's `jax.jvp` through the student) and any order of differentiation reuse the same two rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The reference computation: out[b, h, w, c] = Σ_ij x[b, h+i-k//2, w+j-k//2, c] · kernel[i, j, 0, c]."""
    k = kernel.shape[0]
    height, width = x.shape[1:3]
    padded = _pad(x, k)
    return sum(padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0] for i in range(k) for j in range(k))


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x: [B, H, W, C], kernel: [k, k, 1, C] with k odd -> [B, H, W, C] (zero 'same' padding)."""
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0 or kernel.shape[2] != 1:
        raise ValueError(f"depthwise kernel of shape {kernel.shape}: expected [k, k, 1, C] with k odd")
    if x.ndim != 4 or x.shape[-1] != kernel.shape[-1]:
        raise ValueError(f"depthwise input of shape {x.shape}: expected [B, H, W, {kernel.shape[-1]}]")
    return depthwise_p.bind(x, kernel)


def _pad(x: jax.Array, k: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))


def _kernel_gradient(x: jax.Array, cotangent: jax.Array, k: int) -> jax.Array:
    """Σ_{b,h,w} x[b, h+i-k//2, w+j-k//2, c] · cotangent[b, h, w, c] for every tap (i, j): [k, k, 1, C]."""
    padded = _pad(x, k)
    taps = jnp.array([(i, j) for i in range(k) for j in range(k)])

    def tap(offset):
        window = jax.lax.dynamic_slice(padded, (0, offset[0], offset[1], 0), x.shape)
        return (window * cotangent).sum((0, 1, 2))

    return jax.lax.map(tap, taps).reshape(k, k, 1, -1)


def _jvp(primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    out = depthwise_p.bind(x, kernel)
    terms = []
    if type(dx) is not ad.Zero:
        terms.append(depthwise_p.bind(dx, kernel))
    if type(dkernel) is not ad.Zero:
        terms.append(depthwise_p.bind(x, dkernel))
    return out, sum(terms) if terms else ad.Zero.from_primal_value(out)


def _transpose(cotangent, x, kernel):
    """Linear in whichever operand is undefined (the op is bilinear)."""
    if type(cotangent) is ad.Zero:
        return None, None
    if ad.is_undefined_primal(x):
        return depthwise_p.bind(cotangent, kernel[::-1, ::-1]), None
    k = kernel.aval.shape[0]
    return None, _kernel_gradient(x, cotangent, k).astype(kernel.aval.dtype)


def _batch(args, dims):
    x, kernel = args
    x_dim, kernel_dim = dims
    if kernel_dim is not None:  # a batch of kernels: no fast path needed
        return jax.vmap(shifted_sum, (x_dim, kernel_dim))(x, kernel), 0
    x = jnp.moveaxis(x, x_dim, 0)
    out = depthwise_p.bind(x.reshape(-1, *x.shape[2:]), kernel)
    return out.reshape(x.shape[:2] + out.shape[1:]), 0


depthwise_p = Primitive("s2flash_depthwise_conv")
depthwise_p.def_impl(lambda x, kernel: jax.jit(shifted_sum)(x, kernel))
depthwise_p.def_abstract_eval(lambda x, kernel: jax.core.ShapedArray(x.shape, jnp.result_type(x.dtype, kernel.dtype)))
mlir.register_lowering(depthwise_p, mlir.lower_fun(shifted_sum, multiple_results=False))
ad.primitive_jvps[depthwise_p] = _jvp
ad.primitive_transposes[depthwise_p] = _transpose
batching.primitive_batchers[depthwise_p] = _batch
