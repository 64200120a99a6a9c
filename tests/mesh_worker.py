"""Run by tests/test_mesh.py in a fresh process with 8 fake CPU devices (XLA_FLAGS set by the caller).

Checks that sharded_init gives bit-identical parameters on every mesh shape, that each parameter is
laid out as the rules table says, and that a jitted forward with sharded parameters and a batch
sharded over (data, fsdp) equals the single-device forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from s2flash_jax.config import load_config
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.parallel.mesh import MeshConfig, make_mesh, sharded_init

MESHES = (MeshConfig(data=8), MeshConfig(data=1, fsdp=8), MeshConfig(data=2, fsdp=2, tensor=2),
          MeshConfig(data=-1, fsdp=1, tensor=4))


def main() -> None:
    assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()}"
    config = load_config("configs/tiny.py")

    def build():
        return SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(0))

    reference_state = jax.jit(lambda: nnx.split(build())[1])()
    reference = nnx.merge(nnx.graphdef(build()), reference_state)
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (8, 8, 8, config.model.in_channels))
    caption = jax.random.normal(keys[1], (8, 5, config.model.caption_channels))
    t, guidance = jnp.linspace(0.1, 0.9, 8), jnp.full((8,), 0.45)

    def forward(model, x, caption):
        return model(x, t, caption, None, guidance)

    expected = jax.jit(forward)(reference, x, caption)
    for mesh_config in MESHES:
        mesh = make_mesh(mesh_config)
        model = sharded_init(build, mesh)
        state = nnx.state(model)
        for (path, got), want in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(reference_state), strict=True):
            name = jax.tree_util.keystr(path)
            assert np.array_equal(got, want), f"{mesh_config.describe()}: {name} differs from the unsharded init"
            assert got.sharding.mesh.shape == mesh.shape, name
        kernel = state["transformer_blocks"]["ff"]["conv_inverted"]["kernel"][...]
        assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor"), kernel.sharding.spec
        per_device = kernel.addressable_shards[0].data.shape
        assert per_device == (kernel.shape[0], kernel.shape[1] // mesh.shape["fsdp"],
                              kernel.shape[2] // mesh.shape["tensor"]), per_device

        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        with jax.set_mesh(mesh):
            got = jax.jit(forward)(model, jax.device_put(x, batch), jax.device_put(caption, batch))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"forward on mesh {mesh_config.describe()}")
        print(f"ok {mesh_config.describe()} mesh {dict(mesh.shape)}")


if __name__ == "__main__":
    main()
