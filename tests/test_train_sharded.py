"""The training engine on several devices and processes: the same losses whatever the layout.

Each case runs tests/train_worker.py in fresh processes with fake CPU devices (fixed when JAX
starts) on a tiny dataset written here, and compares the per-update losses.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from launch.local import start_processes
from tests.conftest import REPO, fake_devices_env
from tests.tiny_data import write_tiny_dataset

WORKER = str(REPO / "tests" / "train_worker.py")
COMPARED = ("generator/loss", "scm/loss", "generator/adversarial", "discriminator/loss", "generator/grad_norm",
            "discriminator/grad_norm")


def run_worker(args, devices: int, **env) -> dict:
    result = subprocess.run([sys.executable, WORKER, *map(str, args)], cwd=REPO, env=fake_devices_env(devices, **env),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return parse_result(result.stdout)


def parse_result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_losses(got: list[dict], want: list[dict], what: str, rtol: float = 1e-5) -> None:
    assert len(got) == len(want) == 3, what
    compared = 0
    for step, (g, w) in enumerate(zip(got, want)):
        for key in COMPARED:
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=1e-7, err_msg=f"{what}: step {step} {key}")
                compared += 1
    assert compared >= 6, f"{what}: too few metrics compared ({compared})"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def test_losses_equal_across_mesh_shapes(dataset, tmp_path):
    """Pure data parallelism against all three axes at once (fsdp alone: the resume test below, slow)."""
    result = run_worker(["meshes", dataset, tmp_path], devices=8)
    reference = result["data=8"]
    assert all(np.isfinite(v) for step in reference for v in step.values())
    assert_same_losses(result["data=2,fsdp=2,tensor=2"], reference, "mesh data=2,fsdp=2,tensor=2 vs data=8")


@pytest.mark.slow  # ~3 min; CI keeps the mesh-equality test above and test_distributed's two processes
def test_resume_on_another_mesh_and_two_processes_equal_one(dataset, tmp_path):
    """One process with 4 devices: save on (fsdp=4), resume on (data=2, fsdp=2). Then 2 processes x 2
    devices (data=4), against the same uninterrupted 4-device run (meshes agree, as tested above)."""
    one = run_worker(["remesh", dataset, tmp_path / "one"], devices=4)
    assert_same_losses(one["resumed"], one["uninterrupted"], "fsdp=4 -> data=2,fsdp=2")

    procs = start_processes([sys.executable, WORKER, "losses", dataset, str(tmp_path / "multi"), "data=-1"],
                            processes=2, devices_per_process=2, environ=fake_devices_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    for out in outputs:
        multi = parse_result(out)
        assert multi["joined"] == "explicit" and multi["processes"] == 2 and multi["devices"] == 4
        assert_same_losses(multi["losses"], one["uninterrupted"], "2 processes x 2 devices vs 1 x 4")
