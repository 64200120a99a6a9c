"""The R1 penalty against central differences in float64, on inputs and on head parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.losses.r1 import r1_penalty
from s2flash_jax.models.discriminator import ConvDiscriminatorHeads

BATCH, TOKENS, WIDTH, HIDDEN = 3, 4, 5, 6
GAMMA = 0.7
EPS = 1e-6  # central differences: O(EPS²) truncation, O(1e-16/EPS) rounding, both ≪ the tolerances


def tiny_head_params(key):
    """A random per-token MLP head: features [B, N, D] -> logits [B, N]."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (WIDTH, HIDDEN), jnp.float64) / WIDTH**0.5,
            "b1": jax.random.normal(k2, (HIDDEN,), jnp.float64) * 0.1,
            "w2": jax.random.normal(k3, (HIDDEN,), jnp.float64) / HIDDEN**0.5}


def tiny_head(params, x):
    return jax.nn.silu(x @ params["w1"] + params["b1"]) @ params["w2"]


def central_difference(f, x: np.ndarray) -> np.ndarray:
    """∂f/∂x for a scalar f of an array x, one entry at a time."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = EPS
        grad[index] = (f(x + step) - f(x - step)) / (2 * EPS)
    return grad


def finite_difference_r1(params, x: np.ndarray) -> float:
    """γ/2 · mean_b ‖∂(Σ_k logits[b, k])/∂x_b‖², each example's gradient differenced on its own."""
    norms = []
    for b in range(x.shape[0]):
        grad = central_difference(lambda xb: float(jnp.sum(tiny_head(params, jnp.asarray(xb)))), x[b])
        norms.append(np.sum(grad**2))
    return GAMMA / 2 * np.mean(norms)


def test_penalty_equals_finite_differences():
    with jax.enable_x64(True):
        params = tiny_head_params(jax.random.key(0))
        x = np.asarray(jax.random.normal(jax.random.key(1), (BATCH, TOKENS, WIDTH), jnp.float64))
        penalty = r1_penalty(lambda f: tiny_head(params, f), jnp.asarray(x), GAMMA)
        assert penalty.dtype == jnp.float64
        np.testing.assert_allclose(penalty, finite_difference_r1(params, x), rtol=1e-8)
        jitted = jax.jit(lambda f: r1_penalty(lambda g: tiny_head(params, g), f, GAMMA))(jnp.asarray(x))
        np.testing.assert_allclose(jitted, penalty, rtol=1e-12)


def test_penalty_gradient_wrt_parameters_equals_finite_differences():
    """d R1 / d params through the second-order gradient, against differences of the penalty."""
    with jax.enable_x64(True):
        params = tiny_head_params(jax.random.key(2))
        x = jax.random.normal(jax.random.key(3), (BATCH, TOKENS, WIDTH), jnp.float64)

        def penalty(p):
            return r1_penalty(lambda f: tiny_head(p, f), x, GAMMA)

        grads = jax.grad(penalty)(params)
        for name in ("w1", "b1", "w2"):
            def of_one(value, name=name):
                return float(penalty({**params, name: jnp.asarray(value)}))

            expected = central_difference(of_one, np.asarray(params[name]))
            assert np.abs(expected).max() > 1e-3, name  # the check is not vacuous
            np.testing.assert_allclose(grads[name], expected, rtol=1e-6, atol=1e-10, err_msg=name)


def test_pytree_inputs_sum_their_squared_norms():
    """Head inputs of several heads: one example's norm runs over all its feature maps."""
    with jax.enable_x64(True):
        pa, pb = tiny_head_params(jax.random.key(4)), tiny_head_params(jax.random.key(5))
        xa = jax.random.normal(jax.random.key(6), (BATCH, TOKENS, WIDTH), jnp.float64)
        xb = jax.random.normal(jax.random.key(7), (BATCH, 2, WIDTH), jnp.float64)
        both = r1_penalty(lambda fs: tiny_head(pa, fs[0]) + jnp.mean(tiny_head(pb, fs[1]), axis=1, keepdims=True),
                          [xa, xb], GAMMA)
        first = r1_penalty(lambda f: tiny_head(pa, f), xa, GAMMA)
        second = r1_penalty(lambda f: jnp.mean(tiny_head(pb, f), axis=1) * TOKENS, xb, GAMMA)
        np.testing.assert_allclose(both, first + second, rtol=1e-12)


def test_conv_heads_on_their_features_under_jit():
    """R1 with respect to head inputs (SANA-Sprint's choice) on the S2-Flash heads: finite, positive,
    and it trains the heads' parameters."""
    grid, width = (8, 8), 32
    heads = ConvDiscriminatorHeads(width, 2, grid, rngs=nnx.Rngs(0))
    features = list(jax.random.normal(jax.random.key(0), (2, 4, grid[0] * grid[1], width)))

    @nnx.jit
    def penalty_and_grads(model, fs):
        return nnx.value_and_grad(lambda m: r1_penalty(lambda f: m(f), fs, 1e-2))(model)

    penalty, grads = penalty_and_grads(heads, features)
    assert penalty.dtype == jnp.float32 and np.isfinite(penalty) and penalty > 0
    kernel = grads.heads[0].downsample[0].conv.kernel[...]
    assert np.all(np.isfinite(kernel)) and np.any(kernel != 0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="leading axis"):
        r1_penalty(lambda fs: fs[0].sum(axis=1), [jnp.ones((2, 3)), jnp.ones((4, 3))], 1.0)
    with pytest.raises(ValueError, match=r"logits \[B, \.\.\.\] for the B = 2 examples"):
        r1_penalty(jnp.sum, jnp.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match="empty pytree"):
        r1_penalty(lambda fs: jnp.zeros(2), [], 1.0)
