"""Properties of the JAX SANA transformer that do not need the PyTorch reference at run time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel
from flax import nnx

from conversion.sana_diffusers import expected_torch_shapes
from s2flash_jax.config import load_config
from s2flash_jax.models.params import param_paths
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from s2flash_jax.parallel.axes import LOGICAL_AXIS_RULES, logical_to_mesh_axes
from s2flash_jax.precision import FP32

CONFIG_SPECS = ["configs/tiny.py", "configs/tiny.py:teacher", "configs/sana_sprint.py:0.6b",
                "configs/sana_sprint.py:1.6b", "configs/sana_sprint.py:1.6b,teacher"]


def abstract_model(config: SanaConfig) -> SanaTransformer:
    """Shapes and metadata only: no memory for the weights, so 1.6B is free to inspect."""
    return nnx.eval_shape(lambda: SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("spec", CONFIG_SPECS)
def test_every_parameter_has_known_logical_axes(spec):
    config = load_config(spec).model
    config = dataclasses.replace(config, interpolation_scale=1.0, norm_elementwise_affine=True, attention_bias=True)
    known = dict(LOGICAL_AXIS_RULES)
    for path, (shape, names) in param_paths(abstract_model(config)).items():
        assert names is not None, f"{path} has no logical axis names"
        assert len(names) == len(shape), f"{path}: names {names} for shape {shape}"
        assert all(n in known for n in names), f"{path}: {names} not all in the rules table"
        spec_axes = [a for a in logical_to_mesh_axes(names) if a is not None]
        assert len(spec_axes) == len(set(spec_axes)), f"{path}: mesh axis used twice in {spec_axes}"


def test_rules_map_names_and_reject_unknown_ones():
    assert tuple(logical_to_mesh_axes(("layers", "embed", "heads"))) == (None, "fsdp", "tensor")
    # a mesh axis already used by an earlier dimension leaves the later one unsharded
    assert tuple(logical_to_mesh_axes(("embed", "embed"))) == ("fsdp", None)
    with pytest.raises(KeyError, match="'tokens' has no rule"):
        logical_to_mesh_axes(("tokens",))


@pytest.mark.parametrize("size", ["0.6b", "1.6b"])
@pytest.mark.parametrize("teacher", [False, True])
def test_sprint_configs_have_exactly_the_diffusers_parameters(size, teacher):
    """Key set and every shape equal diffusers' model for the published Sprint configs (built on meta)."""
    config = load_config(f"configs/sana_sprint.py:{size}" + (",teacher" if teacher else "")).model
    with torch.device("meta"):
        reference = SanaTransformer2DModel(**config.to_diffusers())
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    model = abstract_model(config)
    assert expected_torch_shapes(model) == reference_shapes
    n_jax = sum(int(np.prod(shape)) for shape, _ in param_paths(model).values())
    logvar = (config.inner_dim + 1) if config.logvar_head else 0
    assert n_jax == sum(int(np.prod(s)) for s in reference_shapes.values()) + logvar
    assert n_jax == pytest.approx({"0.6b": 0.59e9, "1.6b": 1.6e9}[size], rel=0.05)


def test_forward_mode_derivatives_are_exact():
    """The sCM loss takes jax.jvp through the student along (dx, dt).

    Checked two ways: against reverse mode through the identity u·(J v) = (Jᵀu)·v (exact up to float32
    rounding), and against central finite differences along x and along t separately (loose: fp32 and
    ReLU kinks), so a time path that silently drops out of the derivative is caught.
    """
    config = load_config("configs/tiny.py").model
    model = SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))
    # non-zero output and text layers so no derivative is trivially zero
    model.proj_out.kernel[...] = jax.random.normal(jax.random.key(1), model.proj_out.kernel[...].shape) * 0.1
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (2, 8, 8, config.in_channels))
    dx = jax.random.normal(keys[1], x.shape)
    t = jnp.array([0.3, 0.7])
    caption = jax.random.normal(keys[2], (2, 5, config.caption_channels))
    u = jax.random.normal(keys[3], x.shape)

    def f(x, t):
        return model(x, t, caption, None, jnp.array([0.45, 0.4]))

    out, tangent = jax.jvp(f, (x, t), (dx, jnp.ones_like(t)))
    _, pullback = jax.vjp(f, x, t)
    u_x, u_t = pullback(u)
    np.testing.assert_allclose(jnp.vdot(u, tangent), jnp.vdot(u_x, dx) + u_t.sum(), rtol=1e-4)

    eps = 1e-3
    for primal_tangent, shifted in (((dx, jnp.zeros_like(t)), lambda e: f(x + e * dx, t)),
                                    ((jnp.zeros_like(x), jnp.ones_like(t)), lambda e: f(x, t + e))):
        _, directional = jax.jvp(f, (x, t), primal_tangent)
        finite = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert jnp.abs(directional).max() > 1e-3
        assert jnp.abs(directional - finite).max() <= 5e-2 * jnp.abs(directional).max()


def test_guidance_input_must_match_the_config():
    config = load_config("configs/tiny.py").model
    model = SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))
    x, caption = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, config.caption_channels))
    with pytest.raises(ValueError, match="guidance must be given exactly when"):
        model(x, 0.5, caption)
    with pytest.raises(ValueError, match=r"expected \[B, H, W, 4\]"):
        model(jnp.zeros((1, 8, 8, 3)), 0.5, caption, guidance=0.45)


def test_diffusers_config_maps_one_to_one():
    config = load_config("configs/sana_sprint.py:0.6b").model
    exported = config.to_diffusers()
    assert "logvar_head" not in exported
    assert SanaConfig.from_diffusers({**exported, "_class_name": "SanaTransformer2DModel"},
                                     logvar_head=True, gradient_checkpointing=True) == config
    with pytest.raises(ValueError, match=r"'num_layer' \(did you mean 'num_layers'\?\)"):
        SanaConfig.from_diffusers({**exported, "num_layer": 3})
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        SanaConfig(qk_norm="layer_norm")
