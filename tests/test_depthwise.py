"""The depthwise-conv primitive against XLA's grouped convolution, through every transform the
recipes use: forward, both gradients, forward-mode (sCM's jvp), gradients of a jvp, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2flash_jax.models.depthwise import depthwise_conv


def grouped_conv(x, kernel):
    """The definition: a 'same'-padded conv with one group per channel."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1], precision="highest")


def inputs(k, seed=0):
    kx, kk, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (2, 5, 7, 6))
    return x, jax.random.normal(kk, (k, k, 1, 6)), jax.random.normal(kt, x.shape)


def close(a, b):
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(p, q, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_and_gradients_equal_the_grouped_conv(k):
    x, kernel, weight = inputs(k)
    close(depthwise_conv(x, kernel), grouped_conv(x, kernel))
    loss = lambda conv: lambda x, kernel: (jnp.sin(conv(x, kernel)) * weight).sum()  # noqa: E731
    close(jax.grad(loss(depthwise_conv), (0, 1))(x, kernel), jax.grad(loss(grouped_conv), (0, 1))(x, kernel))
    close(jax.jit(jax.grad(loss(depthwise_conv), (0, 1)))(x, kernel), jax.grad(loss(grouped_conv), (0, 1))(x, kernel))


def test_forward_mode_and_its_gradient_equal_the_grouped_conv():
    """sCM differentiates a loss that holds the jvp of the network: reverse over forward mode."""
    x, kernel, tangent = inputs(3, seed=1)
    dkernel = jnp.flip(kernel, 0)
    for tangents in ((tangent, jnp.zeros_like(kernel)), (tangent, dkernel)):
        close(jax.jvp(depthwise_conv, (x, kernel), tangents), jax.jvp(grouped_conv, (x, kernel), tangents))

    def loss(conv):
        def f(x, kernel):
            out, dout = jax.jvp(lambda x: jnp.tanh(conv(x, kernel)), (x,), (tangent,))
            return (out * dout).sum()
        return f

    close(jax.grad(loss(depthwise_conv), (0, 1))(x, kernel), jax.grad(loss(grouped_conv), (0, 1))(x, kernel))
    hessian_vector = lambda conv: jax.jvp(jax.grad(lambda x: jnp.sin(conv(x, kernel)).sum()), (x,), (tangent,))  # noqa: E731
    close(hessian_vector(depthwise_conv), hessian_vector(grouped_conv))


def test_vmap_over_inputs_and_over_kernels():
    x, kernel, _ = inputs(3, seed=2)
    xs, kernels = jnp.stack([x, -x, 2 * x]), jnp.stack([kernel, -kernel, jnp.flip(kernel, 1)])
    close(jax.vmap(depthwise_conv, (0, None))(xs, kernel), jax.vmap(grouped_conv, (0, None))(xs, kernel))
    close(jax.vmap(depthwise_conv, (2, 0))(jnp.moveaxis(xs, 0, 2), kernels),
          jax.vmap(grouped_conv)(xs, kernels))


def test_bad_shapes_are_refused():
    x, kernel, _ = inputs(3)
    with pytest.raises(ValueError, match=r"expected \[k, k, 1, C\] with k odd"):
        depthwise_conv(x, jnp.zeros((2, 2, 1, 6)))
    with pytest.raises(ValueError, match=r"expected \[B, H, W, 6\]"):
        depthwise_conv(x[..., :4], kernel)
