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
# The largest parameter difference between a run trained partly by 2 processes and one trained by 1:
# their all-reduces sum across the process boundary in another order (measured 1.5e-8 after 2
# updates). That an export equals its run's weights bit for bit is test_relative_paths' check.
EXPORT_TOLERANCE = 1e-6
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
    """Pure data parallelism against all three axes at once (fsdp alone: the pod journey below)."""
    result = run_worker(["meshes", dataset, tmp_path], devices=8)
    reference = result["data=8"]
    assert all(np.isfinite(v) for step in reference for v in step.values())
    assert_same_losses(result["data=2,fsdp=2,tensor=2"], reference, "mesh data=2,fsdp=2,tensor=2 vs data=8")


def test_a_pod_run_resumes_on_another_process_count_and_mesh_and_exports_on_one_host(dataset, tmp_path):
    """A pod's journey on fake devices: 2 processes x 2 devices train 2 updates on fsdp=4 and stop
    with a checkpoint; one process with 4 devices resumes the run on (data=2, fsdp=2), trains the
    last update and exports it. Losses and exports equal one process's uninterrupted fsdp=4 run."""
    run, reference = tmp_path / "pod", tmp_path / "one"
    procs = start_processes([sys.executable, WORKER, "losses", dataset, str(run), "data=1,fsdp=-1", "2"],
                            processes=2, devices_per_process=2, environ=fake_devices_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    pod = [parse_result(out) for out in outputs]
    assert all(r["joined"] == "explicit" and r["processes"] == 2 and r["devices"] == 4 for r in pod)
    assert pod[0]["losses"] == pod[1]["losses"]  # every process logs the same global metrics

    one = run_worker(["journey", dataset, run, reference], devices=4)
    assert_same_losses(pod[0]["losses"] + one["resumed"], one["uninterrupted"],
                       "2 processes on fsdp=4, then 1 process on data=2,fsdp=2 vs 1 process on fsdp=4")
    for step, difference in one["export_difference"].items():
        assert difference <= EXPORT_TOLERANCE, f"export at step {step} differs by {difference}"
