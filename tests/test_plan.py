"""`s2flash plan`: the training step compiled for a mesh of fake devices, memory per device."""

import json
import math
import subprocess
import sys

import jax
import numpy as np

from s2flash_jax.config import load_config
from s2flash_jax.train.state import initialiser
from tests.conftest import REPO


def test_plan_counts_sharded_state_and_step_memory():
    result = subprocess.run(
        [sys.executable, "-m", "s2flash_jax.cli", "plan", "--config", "configs/tiny.py", "--mesh", "data=1,fsdp=4",
         "--device-kind", "h100", "--devices", "4", "--json"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}

    abstract = initialiser(load_config("configs/tiny.py")).abstract
    unsharded = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract.distill.params))
    trained = plan["held"]["trained parameters"]
    assert unsharded / 4 <= trained < unsharded  # FSDP split what the rules shard, nothing was lost
    assert plan["held"]["EMA"] == 0  # the tiny config keeps no EMA
    for phase in ("generator", "discriminator"):
        assert plan["temporaries"][phase] > 0
        assert plan["step_peak"][phase] >= sum(plan["held"].values())
    assert plan["fits"] and plan["capacity"] == 80 << 30


def test_plan_rejects_a_mesh_that_does_not_fit_the_devices():
    result = subprocess.run(
        [sys.executable, "-m", "s2flash_jax.cli", "plan", "--config", "configs/tiny.py", "--mesh", "data=3",
         "--device-kind", "tpu-v5e", "--devices", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "mesh data=3 fsdp=1 tensor=1 needs 3 devices, found 4" in result.stderr
