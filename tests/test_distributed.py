"""How a process decides to join a job, and two local processes joined with jax.distributed."""

import subprocess
import sys

import pytest

from launch.local import start_processes
from s2flash_jax.parallel.distributed import DistributedConfig, resolve
from tests.conftest import REPO, fake_devices_env


def test_explicit_settings_from_config_or_environment():
    how, explicit = resolve(DistributedConfig("10.0.0.1:1234", 4, 3), environ={})
    assert how == "explicit" and explicit == DistributedConfig("10.0.0.1:1234", 4, 3)
    env = {"S2FLASH_COORDINATOR": "host:99", "S2FLASH_NUM_PROCESSES": "2", "S2FLASH_PROCESS_ID": "1"}
    assert resolve(environ=env) == ("explicit", DistributedConfig("host:99", 2, 1))


@pytest.mark.parametrize("env, how", [({}, "single"), ({"SLURM_NTASKS": "1"}, "single"),
                                      ({"SLURM_NTASKS": "16"}, "cluster"), ({"OMPI_COMM_WORLD_SIZE": "2"}, "cluster"),
                                      ({"TPU_WORKER_HOSTNAMES": "a,b"}, "cluster")])
def test_clusters_are_recognised_from_the_environment(env, how):
    assert resolve(environ=env)[0] == how


@pytest.mark.parametrize("config, env, message", [
    (DistributedConfig(coordinator_address="h:1"), {}, "num_processes .*S2FLASH_NUM_PROCESSES.* missing"),
    (DistributedConfig("h:1", 2, 2), {}, r"process_id=2 must be in \[0, 2\)"),
    (DistributedConfig(), {"S2FLASH_NUM_PROCESSES": "two"}, "S2FLASH_NUM_PROCESSES='two' is not an integer"),
])
def test_incomplete_or_bad_settings_are_rejected(config, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(config, env)


def test_two_processes_share_a_sharded_model_and_batch():
    procs = start_processes([sys.executable, str(REPO / "tests" / "sharded_worker.py"), "multiprocess"],
                            processes=2, devices_per_process=2, environ=fake_devices_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for process_id, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"ok process {process_id} mesh" in out, out
