"""The launchers' dry runs for 1, 2 and 4 hosts: every process gets the same train command and its own
process id, the right process count and the coordinator's address, as `s2flash train` reads them.

Nothing here reaches a cluster or the network: launchers run with --dry-run while subprocess is
disabled, and where a rendered script is interpreted (to see what each host really receives after
the shell's quoting), it runs under bash with a PATH that holds only stub gcloud / srun /
scontrol / python programs written by the test, which record what they are given.
"""

import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from launch import gke, local, slurm, tpu_pod
from launch.job import COORDINATOR, NUM_PROCESSES, PROCESS_ID
from launch.tpu_slices import tpu_slice
from s2flash_jax.parallel.distributed import DistributedConfig, resolve
from tests.conftest import REPO

CONFIG = "configs/tiny.py"
OVERRIDES = ["data.path=/shared/data", "train.steps=7", "train.batch_size=32", "sample.guidance_scale=4.5"]
TRAIN_ARGS = ["-m", "s2flash_jax.cli", "train", "--config", CONFIG, "--out", "/shared/runs/x", "--resume", *OVERRIDES]
HOSTS = [1, 2, 4]


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # launchers load the config from the working directory


def dry_run(module, args, capsys, monkeypatch) -> str:
    """module.main(args + --dry-run) with subprocess disabled; returns what it printed."""
    def refuse(*a, **k):
        raise AssertionError(f"a dry run tried to run {a[:1]}")

    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "run", refuse)
        patch.setattr(subprocess, "Popen", refuse)
        code = module.main([*args, "--config", CONFIG, "--out", "/shared/runs/x", "--dry-run", *OVERRIDES])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def write_stubs(directory, programs: dict[str, str]) -> str:
    """Executable bash stubs in `directory` (plus bash itself); returns it, to be the whole PATH."""
    directory.mkdir()
    for name, body in programs.items():
        path = directory / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (directory / "bash").symlink_to("/bin/bash")
    return str(directory)


# A stub interpreter that records, per process id, what it was started with.
RECORDER = ('out="$RECORD/$S2FLASH_PROCESS_ID"\n'
            'printf "%s\\n" "$S2FLASH_COORDINATOR" "$S2FLASH_NUM_PROCESSES" "$S2FLASH_PROCESS_ID" '
            '"${CUDA_VISIBLE_DEVICES:-unset}" "$PWD" "$@" > "$out"\n')


def recorded(record_dir) -> dict[int, dict]:
    runs = {}
    for path in record_dir.iterdir():
        coordinator, num, pid, cuda, cwd, *argv = path.read_text().splitlines()
        runs[int(path.name)] = {"env": {COORDINATOR: coordinator, NUM_PROCESSES: num, PROCESS_ID: pid},
                                "cuda": cuda, "cwd": cwd, "argv": argv}
    return runs


def assert_joins(runs: dict[int, dict], processes: int, coordinator: str) -> None:
    """Processes 0..n-1 each ran the same train command and join as `s2flash train` reads it."""
    assert sorted(runs) == list(range(processes))
    for pid, run in runs.items():
        assert run["argv"] == TRAIN_ARGS
        assert resolve(environ=run["env"]) == ("explicit", DistributedConfig(coordinator, processes, pid))


# ---- local ----

@pytest.mark.parametrize("processes", HOSTS)
def test_local_dry_run_gives_each_process_its_id_and_the_same_command(processes, capsys, monkeypatch):
    out = dry_run(local, ["--processes", str(processes), "--devices-per-process", "2", "--port", "4321"],
                  capsys, monkeypatch)
    lines = out.splitlines()
    assert len(lines) == processes
    for pid, line in enumerate(lines):
        words = shlex.split(line)
        split = words.index(sys.executable)
        env = dict(word.split("=", 1) for word in words[:split])
        assert words[split + 1:] == TRAIN_ARGS
        assert resolve(environ=env) == ("explicit", DistributedConfig("127.0.0.1:4321", processes, pid))
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert env["JAX_PLATFORMS"] == "cpu"


def test_local_process_env_replaces_a_device_count_and_keeps_other_xla_flags():
    env = local.process_env(1, 2, 4, 99, environ={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1"})
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", "--foo=1"]


# ---- TPU pod ----

@pytest.mark.parametrize("accelerator, hosts", [("v4-8", 1), ("v4-16", 2), ("v4-32", 4)])
def test_tpu_pod_dry_run_starts_every_worker_with_its_id(accelerator, hosts, capsys, monkeypatch, tmp_path):
    args = ["--name", "sprint", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type", accelerator]
    script = dry_run(tpu_pod, args, capsys, monkeypatch)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # parses, runs nothing
    lines = script.splitlines()
    gcloud = "gcloud compute tpus tpu-vm"
    assert f"{gcloud} create sprint --zone=us-east5-a --project=proj --accelerator-type={accelerator} " \
           f"--version=tpu-ubuntu2204-base" in script
    assert sum(line.startswith(f"{gcloud} scp ") and line.endswith("--worker=all") for line in lines) == 1
    install = [line for line in lines if line.startswith(f"{gcloud} ssh sprint") and "--worker=all" in line]
    assert len(install) == 1 and "pip install" in install[0]
    starts = [line for line in lines if " --worker=" in line and "--worker=all" not in line]
    assert [next(w for w in shlex.split(line) if w.startswith("--worker=")) for line in starts] == \
        [f"--worker={i}" for i in range(hosts)]

    # What each worker's shell receives, through the script's quoting, with stubs for gcloud, python3 and
    # the archiving tools; ssh --worker=i runs its command in a fake home, ssh --worker=all only records.
    gcloud_stub = ('verb=$4; args=("$@"); cmd=""; format=""; worker=""\n'
                   'for ((i=0; i<${#args[@]}; i++)); do case "${args[i]}" in\n'
                   '  --format=*) format="${args[i]#--format=}";; --worker=*) worker="${args[i]#--worker=}";;\n'
                   '  --command) cmd="${args[i+1]}";; esac; done\n'
                   'echo "$verb $worker" >> "$RECORD/../gcloud.log"\n'
                   'case "$verb" in\n'
                   '  describe) if [ "$format" = "value(state)" ]; then echo READY; else echo 10.1.2.3; fi;;\n'
                   # ssh forwards its stdin, as the real one does: drain it before running the command.
                   '  ssh) while read -r _; do :; done\n'
                   '       if [ "$worker" != all ]; then cd "$WORKER_HOME" && bash -c "$cmd"; fi;;\n'
                   'esac\n')
    path = write_stubs(tmp_path / "bin", {"gcloud": gcloud_stub, "python3": RECORDER, "git": "", "tar": "",
                                          "rm": "", "mktemp": 'echo "$RECORD/../archive"\n'})
    (tmp_path / "record").mkdir()
    (tmp_path / "home" / tpu_pod.REMOTE_DIR).mkdir(parents=True)
    # Piped into bash, as `--dry-run | bash` does: the install ssh must not swallow the rest of the script.
    subprocess.run(["/bin/bash"], input=script, text=True, check=True, env={
        "PATH": path, "RECORD": str(tmp_path / "record"), "WORKER_HOME": str(tmp_path / "home")})
    runs = recorded(tmp_path / "record")
    assert_joins(runs, hosts, "10.1.2.3:8476")
    assert all(run["cwd"] == str(tmp_path / "home" / tpu_pod.REMOTE_DIR) for run in runs.values())
    calls = [c for c in (tmp_path / "gcloud.log").read_text().splitlines() if not c.startswith("describe")]
    # An existing (READY) slice is reused, not created again; the package goes to all workers first, then
    # the workers start (in parallel, so in any order).
    assert calls[:2] == ["scp all", "ssh all"]
    assert sorted(calls[2:]) == [f"ssh {i}" for i in range(hosts)]


def test_tpu_pod_skip_install_copies_nothing(capsys, monkeypatch):
    script = dry_run(tpu_pod, ["--name", "s", "--zone", "z", "--accelerator-type", "v4-8", "--skip-install"],
                     capsys, monkeypatch)
    assert " scp " not in script and "pip install" not in script and "--worker=0" in script


@pytest.mark.parametrize("accelerator, chips, hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v5p-128", 64, 16),
    ("v6e-64", 64, 16)])
def test_tpu_slice_shapes(accelerator, chips, hosts):
    tpu = tpu_slice(accelerator)
    assert (tpu.chips, tpu.hosts, tpu.devices_per_host) == (chips, hosts, chips // hosts)


@pytest.mark.parametrize("accelerator, message", [("v3-8", "expected one of v4-N, v5litepod-N"),
                                                   ("v4-12", "v4 slices come in sizes")])
def test_unknown_tpu_types_are_refused(accelerator, message, capsys):
    code = tpu_pod.main(["--name", "s", "--zone", "z", "--accelerator-type", accelerator, "--config", CONFIG,
                         "--out", "/o", "--dry-run"])
    assert code == 2 and message in capsys.readouterr().err


def test_tpu_pod_refuses_a_config_path_the_workers_cannot_resolve(capsys):
    code = tpu_pod.main(["--name", "s", "--zone", "z", "--accelerator-type", "v4-8", "--config",
                         str(REPO / CONFIG), "--out", "/o", "--dry-run"])
    assert code == 2 and "relative to the source tree" in capsys.readouterr().err


# ---- SLURM ----

@pytest.mark.parametrize("process_per", ["node", "gpu"])
@pytest.mark.parametrize("nodes", HOSTS)
def test_slurm_script_gives_each_task_its_id_and_the_first_node_as_coordinator(nodes, process_per, capsys,
                                                                               monkeypatch, tmp_path):
    gpus = 8
    per_node = 1 if process_per == "node" else gpus
    script = dry_run(slurm, ["--nodes", str(nodes), "--gpus-per-node", str(gpus), "--process-per", process_per,
                             "--partition", "a3", "--workdir", str(tmp_path)], capsys, monkeypatch)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert {f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--gpus-per-node={gpus}", "--requeue",
            "--partition=a3"} <= set(directives)

    srun = ("shift\n"  # --kill-on-bad-exit=1
            "for ((i=0; i<SIM_TASKS; i++)); do\n"
            '  SLURM_PROCID=$i SLURM_LOCALID=$((i % SIM_PER_NODE)) "$@" || exit 1\ndone\n')
    path = write_stubs(tmp_path / "bin", {"srun": srun, "scontrol": "echo gpu-a17; echo gpu-a18\n",
                                          "head": 'read -r line; echo "$line"\n', "python": RECORDER})
    (tmp_path / "record").mkdir()
    subprocess.run(["/bin/bash", "-c", script], check=True, env={
        "PATH": path, "RECORD": str(tmp_path / "record"), "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_JOB_ID": "5000", "SIM_TASKS": str(nodes * per_node), "SIM_PER_NODE": str(per_node)})
    runs = recorded(tmp_path / "record")
    assert_joins(runs, nodes * per_node, "gpu-a17:62344")  # 5000 % 4096 + 61440
    expected_cuda = {pid: str(pid % per_node) if process_per == "gpu" else "unset" for pid in runs}
    assert {pid: run["cuda"] for pid, run in runs.items()} == expected_cuda
    assert all(run["cwd"] == str(tmp_path) for run in runs.values())


# ---- GKE ----

def container_of(jobset: dict) -> tuple[dict, dict]:
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    return job, job["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("nodes", HOSTS)
def test_gke_jobset_for_gpu_nodes(nodes, capsys, monkeypatch):
    manifest = dry_run(gke, ["--name", "sprint", "--image", "img:1", "--gpu-type", "nvidia-h100-80gb",
                             "--nodes", str(nodes), "--gpus-per-node", "8"], capsys, monkeypatch)
    jobset = yaml.safe_load(manifest)
    job, container = container_of(jobset)
    assert jobset["kind"] == "JobSet" and job["parallelism"] == job["completions"] == nodes
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert container["command"] == ["python", *TRAIN_ARGS]
    env = {e["name"]: e for e in container["env"]}
    assert env[COORDINATOR]["value"] == "sprint-workers-0-0.sprint:8476"
    assert env[NUM_PROCESSES]["value"] == str(nodes)
    assert env[PROCESS_ID]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert job["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    # What each pod's process reads: its completion index as the process id.
    for index in range(nodes):
        pod_env = {COORDINATOR: env[COORDINATOR]["value"], NUM_PROCESSES: env[NUM_PROCESSES]["value"],
                   PROCESS_ID: str(index)}
        assert resolve(environ=pod_env) == ("explicit", DistributedConfig("sprint-workers-0-0.sprint:8476", nodes,
                                                                           index))


@pytest.mark.parametrize("accelerator, hosts, topology", [("v5litepod-8", 1, "2x4"), ("v4-16", 2, "2x2x2"),
                                                          ("v5litepod-16", 4, "4x4")])
def test_gke_jobset_for_tpu_slices(accelerator, hosts, topology, capsys, monkeypatch):
    jobset = yaml.safe_load(dry_run(gke, ["--name", "s", "--image", "i", "--tpu-type", accelerator,
                                          "--gcs-bucket", "bucket"], capsys, monkeypatch))
    job, container = container_of(jobset)
    pod = job["template"]
    assert job["parallelism"] == hosts
    assert pod["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    assert container["resources"]["limits"] == {"google.com/tpu": tpu_slice(accelerator).devices_per_host}
    assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    assert pod["spec"]["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bucket"
    assert container["volumeMounts"] == [{"name": "gcs", "mountPath": "/gcs"}]


# ---- layout checks shared by every launcher ----

@pytest.mark.parametrize("module, args", [
    (local, ["--processes", "2", "--devices-per-process", "4"]),
    (slurm, ["--nodes", "2", "--gpus-per-node", "4"]),
    (tpu_pod, ["--name", "s", "--zone", "z", "--accelerator-type", "v4-16"]),
    (gke, ["--name", "s", "--image", "i", "--gpu-type", "nvidia-l4", "--nodes", "2", "--gpus-per-node", "4"]),
])
def test_a_mesh_the_job_cannot_lay_out_is_refused_before_launching(module, args, capsys):
    code = module.main([*args, "--config", CONFIG, "--out", "/o", "--mesh", "data=1,fsdp=16", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mesh data=1 fsdp=16 tensor=1 needs 16 devices, found 8" in err and "2 processes x 4 devices = 8" in err


def test_a_batch_that_does_not_split_over_the_processes_is_refused(capsys):
    code = local.main(["--processes", "3", "--config", CONFIG, "--out", "/o", "--dry-run"])
    assert code == 2
    assert "train.batch_size=8 does not split evenly" in capsys.readouterr().err


def test_a_bad_override_is_refused_with_the_configs_own_message(capsys):
    code = slurm.main(["--nodes", "1", "--gpus-per-node", "1", "--config", CONFIG, "--out", "/o", "train.stepz=3",
                       "--dry-run"])
    assert code == 2 and "unknown config key 'train.stepz'" in capsys.readouterr().err


# ---- a real multi-process run through the local launcher ----

@pytest.mark.slow
def test_local_launcher_trains_across_two_processes_and_a_relaunch_resumes(tmp_path):
    """`s2flash train` in 2 processes x 2 fake devices joined by jax.distributed; then the same
    launch with more steps continues from the checkpoint, as a relaunch after preemption does."""
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    # No persistent compilation cache: only process 0 writes it, so a warm cache makes the two processes
    # compile for very different times, and gloo waits only 30 s for a peer at a step's first collective.
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def launch(steps: int) -> str:
        done = subprocess.run([sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "2",
                               "--config", CONFIG, "--out", str(run_dir), f"data.path={data}", f"train.steps={steps}",
                               "train.log_every=1", "train.checkpoint_every=0"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    out = launch(2)
    assert f"[0] stopped at step 2 of 2; checkpoints in {run_dir / 'checkpoints'}" in out
    step = run_dir / "checkpoints" / "2"
    assert (step / "commit_success.txt").is_file()
    # Each process saved its own data-iterator position: the job really had two processes.
    assert sorted(p.name for p in (step / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                              "process_1-of-2.json"]
    out = launch(3)
    assert f"[0] resumed from {step}" in out and "[0] stopped at step 3 of 3" in out
    assert (run_dir / "checkpoints" / "3" / "commit_success.txt").is_file()
