"""A Cloud TPU VM slice: create it or reuse it, put this package on every worker, start `s2flash
train` on all of them with the same config and overrides.

    python -m launch.tpu_pod --name my-slice --zone us-east5-a --accelerator-type v5litepod-16 \
        --config configs/sana_sprint.py:0.6b --out /mnt/shared/runs/sprint data.path=/mnt/shared/data [--dry-run]

Renders one bash script and pipes it into bash; --dry-run prints it and runs nothing
(`... --dry-run | bash` is the same launch):
1. the slice: its state from `gcloud compute tpus tpu-vm describe`; `create` if there is none
   (--spot for a Spot slice), `delete` then `create` if it was preempted or terminated; a slice in
   any other state is reused as it is;
2. the package (unless --skip-install): this source tree (git's tracked and untracked, not ignored,
   files) is archived here, copied to every worker (`tpu-vm scp --worker=all`), unpacked into
   ~/s2flash-jax and pip-installed there with `jax[tpu]`, pinned by constraints.txt
   (`tpu-vm ssh --worker=all`);
3. the run: worker 0's internal IP is read from the slice, then worker i is started with
   `tpu-vm ssh --worker=i` and S2FLASH_PROCESS_ID=i (the same id the TPU runtime gives that
   worker), all in parallel; the script waits for all and fails if any failed.

Every ssh reads from /dev/null, so that none of them consumes the script when it is piped into bash.
Workers are started one ssh each rather than with --worker=all because each needs its own process
id: `s2flash train` joins the job from explicit variables, since jax.distributed's own detection
on a TPU VM reads the metadata server, which s2flash's join logic does not consult. The run
directory and data must be on storage every worker mounts (Filestore, or a GCS bucket via
gcsfuse); the workers' home directories are not shared.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from launch.job import LaunchError, TrainCommand, add_train_arguments, check_layout, join_env, train_command
from launch.shell import SCRIPT_HEADER, Expr, command_line, quoted_with_variable, submit
from launch.tpu_slices import TpuSlice, tpu_slice

SOURCE = Path(__file__).resolve().parents[1]
REMOTE_DIR = "s2flash-jax"  # relative to each worker's home, where ssh commands start
COORDINATOR_PORT = 8476  # jax.distributed's usual port on TPU VMs
_COORDINATOR_PLACEHOLDER = "@S2FLASH_COORDINATOR@"


def gcloud_tpu(verb: str, operands: list[str], *flags: str, zone: str, project: str | None) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB OPERANDS --zone=.. [--project=..] FLAGS`."""
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, f"--zone={zone}",
            *([f"--project={project}"] if project else []), *flags]


def worker_command(command: TrainCommand, tpu: TpuSlice, worker: int) -> str:
    """What worker `worker` runs (on its own shell, from its home directory); the coordinator is a
    placeholder for the address the launching script reads."""
    return command_line(command.argv(), join_env(_COORDINATOR_PLACEHOLDER, tpu.hosts, worker), cwd=REMOTE_DIR)


def render(command: TrainCommand, tpu: TpuSlice, *, name: str, zone: str, project: str | None = None,
           spot: bool = False, runtime_version: str | None = None, install: bool = True, setup: str = "",
           pip_packages: tuple[str, ...] = ("jax[tpu]",), source: Path = SOURCE) -> str:
    """The launch script (see the module docstring)."""
    gcloud = functools.partial(gcloud_tpu, zone=zone, project=project)
    parts = [SCRIPT_HEADER, "# rendered by launch.tpu_pod, run with bash",
             *_slice_lines(gcloud, tpu, name, spot, runtime_version or tpu.generation.runtime_version)]
    if install:
        parts += _install_lines(gcloud, name, command.python, setup, pip_packages, source)
    parts += _start_lines(gcloud, command, tpu, name)
    return "\n".join(parts) + "\n"


def _slice_lines(gcloud, tpu: TpuSlice, name: str, spot: bool, runtime_version: str) -> list[str]:
    state = gcloud("describe", [name], "--format=value(state)")
    create = gcloud("create", [name], f"--accelerator-type={tpu.accelerator_type}", f"--version={runtime_version}",
                    *(["--spot"] if spot else []))
    return [f"# 1. the slice {name} ({tpu.chips} chips, {tpu.describe()}): reused if it is up, recreated if it "
            f"was preempted",
            f'STATE="$({command_line(state)} 2>/dev/null || true)"',
            'if [ "$STATE" = PREEMPTED ] || [ "$STATE" = TERMINATED ]; then',
            f"  {command_line(gcloud('delete', [name], '--quiet'))}",
            '  STATE=""',
            "fi",
            f'if [ -z "$STATE" ]; then {command_line(create)}; fi']


def _install_lines(gcloud, name: str, python: str, setup: str, pip_packages: tuple[str, ...],
                   source: Path) -> list[str]:
    unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf s2flash-src.tgz -C {REMOTE_DIR}"
              + (f" && {setup}" if setup else "") + " && "
              + command_line([python, "-m", "pip", "install", "--quiet", "-c", f"{REMOTE_DIR}/constraints.txt",
                              "-e", REMOTE_DIR, *pip_packages]))
    archive, src = Expr("$ARCHIVE"), str(source)
    return ["# 2. this source tree on every worker, installed",
            'ARCHIVE="$(mktemp)"',
            f"{command_line(['git', '-C', src, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'])}"
            f" | {command_line(['tar', '-C', src, '--null', '-T', '-', '-czf', archive])}",
            command_line(gcloud("scp", [archive, f"{name}:s2flash-src.tgz"], "--worker=all")),
            command_line(gcloud("ssh", [name], "--worker=all", "--command", unpack)) + " </dev/null",
            'rm -f "$ARCHIVE"']


def _start_lines(gcloud, command: TrainCommand, tpu: TpuSlice, name: str) -> list[str]:
    address = gcloud("describe", [name], "--format=value(networkEndpoints[0].ipAddress)")
    lines = [f"# 3. s2flash train on every worker ({tpu.hosts}), each with its process id; worker 0 coordinates",
             f'COORDINATOR="$({command_line(address)}):{COORDINATOR_PORT}"',
             "pids=()"]
    for worker in range(tpu.hosts):
        remote = quoted_with_variable(worker_command(command, tpu, worker), _COORDINATOR_PLACEHOLDER, "COORDINATOR")
        lines += [f"{command_line(gcloud('ssh', [name], f'--worker={worker}'))} --command {remote} </dev/null &",
                  "pids+=($!)"]
    return lines + ["status=0", 'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done', 'exit "$status"']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="TPU VM (slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-16, v5p-128, v6e-64")
    parser.add_argument("--runtime-version", default=None, help="TPU VM software version (default: per generation)")
    parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
    parser.add_argument("--skip-install", action="store_true", help="do not copy or install the package")
    parser.add_argument("--setup", default="", help="shell command run on every worker before pip install "
                                                    "(e.g. installing Python 3.11 if the image has an older one)")
    add_train_arguments(parser, python="python3")
    args = parser.parse_args(argv)
    try:
        tpu = tpu_slice(args.accelerator_type)
        command = train_command(args)
        config_path = Path(command.config.partition(":")[0])
        if config_path.is_absolute():
            raise LaunchError(f"--config {command.config!r}: give the config's path relative to the source tree "
                              f"(e.g. configs/sana_sprint.py), as the workers resolve it in ~/{REMOTE_DIR}")
        check_layout(command, processes=tpu.hosts, devices_per_process=tpu.devices_per_host, what=tpu.describe())
    except LaunchError as e:
        print(f"launch.tpu_pod: error: {e}", file=sys.stderr)
        return 2
    script = render(command, tpu, name=args.name, zone=args.zone, project=args.project, spot=args.spot,
                    runtime_version=args.runtime_version, install=not args.skip_install, setup=args.setup)
    return submit(script, ["bash"], dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
