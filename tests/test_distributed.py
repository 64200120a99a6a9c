"""How a process decides to join a job, and two local processes joined with jax.distributed."""

import http.server
import os
import subprocess
import sys
import threading

import pytest
from jax._src.clusters import cloud_tpu_cluster

from launch.local import start_processes
from s2flash_jax.parallel.distributed import DistributedConfig, resolve
from tests.conftest import REPO, fake_devices_env


def test_explicit_settings_from_config_or_environment():
    how, explicit = resolve(DistributedConfig("10.0.0.1:1234", 4, 3), environ={})
    assert how == "explicit" and explicit == DistributedConfig("10.0.0.1:1234", 4, 3)
    env = {"S2FLASH_COORDINATOR": "host:99", "S2FLASH_NUM_PROCESSES": "2", "S2FLASH_PROCESS_ID": "1"}
    assert resolve(environ=env) == ("explicit", DistributedConfig("host:99", 2, 1))


# What each scheduler sets in a process it starts (the variables JAX's cluster detection reads).
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
              "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}
MPIRUN_RANK = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "S2FLASH_", "GCE_METADATA", "JAX_COORD")


@pytest.fixture
def bare_environment(monkeypatch):
    """os.environ without any scheduler's or TPU runtime's variables (JAX's detection reads os.environ)."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("env, how, processes, process_id", [
    ({}, "single", None, None),
    (SLURM_TASK, "cluster:slurm", 4, 2),
    (MPIRUN_RANK, "cluster:ompi", 2, 1),
    # Partial or foreign variables are no cluster JAX could join: no coordinator would ever answer.
    ({"SLURM_NTASKS": "16"}, "single", None, None),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "single", None, None),  # not on a TPU VM
])
def test_clusters_are_recognised_as_jax_itself_would_join_them(bare_environment, env, how, processes, process_id):
    for name, value in env.items():
        bare_environment.setenv(name, value)
    assert resolve(environ=os.environ)[0] == how
    if processes is not None:
        assert jax_join_settings()[1:] == (processes, process_id)


class _Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server of one worker of a 4-host TPU VM slice (what a `gcloud compute tpus
    tpu-vm ssh --worker=all` command finds: no S2FLASH_* or TPU_* variables at all)."""

    worker = "2"

    def do_GET(self):  # noqa: N802
        attributes = {"agent-worker-number": self.worker, "tpu-env": "",
                      "worker-network-endpoints": "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8"}
        key = self.path.rsplit("/", 1)[-1]
        ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
        body = attributes.get(key, "").encode() if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_tpu_vm_worker_joins_the_slice_from_the_metadata_server(bare_environment):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bare_environment.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
        # What libtpu's presence makes JAX conclude at start-up on a TPU VM.
        bare_environment.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
        assert resolve(environ=os.environ) == ("cluster:gcetpu", None)
        assert jax_join_settings() == (f"10.130.0.5:{cloud_tpu_cluster.coordinator_port}", 4, 2)
    finally:
        server.shutdown()


def jax_join_settings() -> tuple[str | None, int | None, int | None]:
    """(coordinator, process count, process id) that `jax.distributed.initialize()` derives here."""
    from jax._src.clusters import ClusterEnv

    return ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 10)[:3]


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
