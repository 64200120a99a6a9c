"""Mesh construction, and sharded initialisation on 8 fake CPU devices (in a subprocess, because the
device count is fixed when JAX starts)."""

import subprocess
import sys

import numpy as np
import pytest

from s2flash_jax.parallel.mesh import MeshConfig
from tests.conftest import REPO, fake_devices_env


@pytest.mark.parametrize("config, shape", [(MeshConfig(), (8, 1, 1)), (MeshConfig(data=-1, fsdp=2), (4, 2, 1)),
                                           (MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
                                           (MeshConfig(data=1, fsdp=8, tensor=1), (1, 8, 1))])
def test_mesh_shape_fills_in_the_rest(config, shape):
    assert config.shape(8) == shape


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=3, fsdp=-1), "8 devices do not divide by 3"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices, found 8"),
    (MeshConfig(data=0), "positive"),
])
def test_bad_mesh_sizes_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        config.shape(8)


def test_sharded_init_and_forward_agree_across_mesh_shapes():
    env = fake_devices_env(8)
    result = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_worker.py"), "meshes"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 4, result.stdout


def test_padded_batches_pad_only_the_last_batch_to_a_power_of_two_share():
    from s2flash_jax.parallel.mesh import padded_batches

    rows = np.arange(21)[:, None] * np.ones((1, 3))
    batches = list(padded_batches([rows, rows[:, 0]], batch_size=8, devices=2))
    assert [(len(b[0]), count) for b, count in batches] == [(8, 8), (8, 8), (8, 5)]
    last, count = batches[-1]
    np.testing.assert_array_equal(last[1], [16, 17, 18, 19, 20, 20, 20, 20])  # padded with the last real row
    assert [(len(b[0]), n) for b, n in padded_batches([np.arange(3)], batch_size=64, devices=2)] == [(4, 3)]
    assert [(len(b[0]), n) for b, n in padded_batches([np.arange(1)], batch_size=64, devices=1)] == [(1, 1)]
    np.testing.assert_array_equal(np.concatenate([b[0][:n] for b, n in batches]), rows)
