"""Sharded runs of the tiny SANA in fresh processes, started by tests/test_mesh.py and
tests/test_distributed.py with fake CPU devices set in XLA_FLAGS (fixed when JAX starts).

  python tests/sharded_worker.py meshes        8 devices, one process: four mesh shapes
  python tests/sharded_worker.py multiprocess  2 devices in each of 2 processes (S2FLASH_* set)

Both check that sharded_init gives the unsharded parameters bit for bit, laid out as the rules say,
and that a jitted forward with a batch sharded over (data, fsdp) equals the unsharded forward.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from s2flash_jax.config import load_config
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.parallel.distributed import initialize
from s2flash_jax.parallel.mesh import MeshConfig, make_mesh, sharded_init

CONFIG = load_config("configs/tiny.py")
BATCH = 8


def build() -> SanaTransformer:
    model = SanaTransformer(CONFIG.model, precision=CONFIG.precision, rngs=nnx.Rngs(0))
    # zero-initialised output layers would make every forward (and the comparison) zero
    for kernel, seed in ((model.proj_out.kernel, 1), (model.transformer_blocks.attn2.to_out.kernel, 2)):
        kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed), kernel[...].shape)
    return model


def inputs() -> tuple[jax.Array, ...]:
    """x [B, 8, 8, C], caption [B, 5, C_text], t [B], guidance [B]."""
    keys = jax.random.split(jax.random.key(3), 2)
    return (jax.random.normal(keys[0], (BATCH, 8, 8, CONFIG.model.in_channels)),
            jax.random.normal(keys[1], (BATCH, 5, CONFIG.model.caption_channels)),
            jnp.linspace(0.1, 0.9, BATCH), jnp.full((BATCH,), 0.45))


def forward(model, x, caption, t, guidance):
    return model(x, t, caption, None, guidance)


def check_sharded(mesh, reference_state, expected, local_rows: slice) -> None:
    """sharded_init on `mesh` vs the unsharded reference; this process feeds `local_rows` of the batch."""
    model = sharded_init(build, mesh)
    state = nnx.state(model)
    for (path, got), want in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(reference_state), strict=True):
        name = jax.tree_util.keystr(path)
        local = np.concatenate([np.asarray(s.data).ravel() for s in got.addressable_shards])
        wanted = np.concatenate([np.asarray(want)[s.index].ravel() for s in got.addressable_shards])
        assert np.array_equal(local, wanted), f"{dict(mesh.shape)}: {name} differs from the unsharded init"
    kernel = state["transformer_blocks"]["ff"]["conv_inverted"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor"), kernel.sharding.spec
    assert kernel.addressable_shards[0].data.shape == (
        kernel.shape[0], kernel.shape[1] // mesh.shape["fsdp"], kernel.shape[2] // mesh.shape["tensor"])

    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    arrays = [jax.make_array_from_process_local_data(batch, np.asarray(a)[local_rows]) for a in inputs()]
    with jax.set_mesh(mesh):
        got = multihost_utils.process_allgather(jax.jit(forward)(model, *arrays), tiled=True)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"forward on mesh {dict(mesh.shape)}")
    print(f"ok process {jax.process_index()} mesh {dict(mesh.shape)}", flush=True)


def main(mode: str) -> None:
    if mode == "multiprocess":
        assert initialize() == "explicit" and jax.process_count() == 2
        rows = slice(BATCH // 2 * jax.process_index(), BATCH // 2 * (jax.process_index() + 1))
        meshes = (MeshConfig(data=-1, fsdp=2),)
    else:
        rows = slice(None)
        meshes = (MeshConfig(data=8), MeshConfig(data=1, fsdp=8), MeshConfig(data=2, fsdp=2, tensor=2),
                  MeshConfig(data=-1, tensor=4))
    # the unsharded reference, computed on this process's first device
    with jax.default_device(jax.local_devices()[0]):
        reference_state = jax.jit(lambda: nnx.split(build())[1])()
        expected = np.asarray(jax.jit(forward)(nnx.merge(nnx.graphdef(build()), reference_state), *inputs()))
    for mesh_config in meshes:
        check_sharded(make_mesh(mesh_config), reference_state, expected, rows)


if __name__ == "__main__":
    main(sys.argv[1])
