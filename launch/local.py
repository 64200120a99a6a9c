"""A multi-process job on this machine: N processes joined by jax.distributed, each with its own fake
CPU devices. The same `s2flash train` command and join variables a pod's hosts get, so a
multi-host run can be rehearsed (and tested) without a cluster.

    python -m launch.local --processes 2 --devices-per-process 2 --config configs/tiny.py \
        --out runs/local data.path=DATA [KEY=VALUE ...] [--dry-run]

Each process's output is forwarded with a "[i] " prefix. If one process fails, the others are
stopped (they would otherwise wait for it at the next collective) and its exit status is returned.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from launch.job import LaunchError, TrainCommand, add_train_arguments, check_layout, join_env, positive, train_command
from launch.shell import command_line

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def process_env(process_id: int, processes: int, devices_per_process: int, port: int,
                environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables process `process_id` gets on top of (and replacing in) `environ`: the job's
    join variables, its fake CPU device count and the CPU platform."""
    kept_flags = _DEVICE_COUNT_FLAG.sub("", environ.get("XLA_FLAGS", "")).split()
    return {**join_env(f"127.0.0.1:{port}", processes, process_id),
            "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices_per_process}", *kept_flags]),
            "JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(argv: Sequence[str], *, processes: int, devices_per_process: int, port: int | None = None,
                    environ: Mapping[str, str] = os.environ, **popen_options) -> list[subprocess.Popen]:
    """Start `argv` once per process with its join variables; the caller waits for them."""
    port = free_port() if port is None else port
    return [subprocess.Popen(list(argv), env={**environ, **process_env(i, processes, devices_per_process, port,
                                                                          environ)}, **popen_options)
            for i in range(processes)]


def plan(command: TrainCommand, processes: int, devices_per_process: int, port: int) -> list[str]:
    """One line per process: the variables it gets on top of this environment and the command it
    runs (what --dry-run prints)."""
    return [command_line(command.argv(), process_env(i, processes, devices_per_process, port))
            for i in range(processes)]


def run(command: TrainCommand, *, processes: int, devices_per_process: int, port: int) -> int:
    procs = start_processes(command.argv(), processes=processes, devices_per_process=devices_per_process, port=port,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed: list[int] = []
    stopping = threading.Event()

    def forward(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(f"[{i}] {line}")
        if proc.wait() and not stopping.is_set():
            failed.append(i)
            stopping.set()
            for other in procs:
                if other.poll() is None:
                    other.terminate()

    threads = [threading.Thread(target=forward, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"launch.local: process {failed[0]} failed with exit status {procs[failed[0]].returncode}; "
              f"stopped the others", file=sys.stderr)
        return procs[failed[0]].returncode or 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="number of processes (simulated hosts)")
    parser.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices in each process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    add_train_arguments(parser, python=sys.executable)
    args = parser.parse_args(argv)
    try:
        processes = positive("--processes", args.processes)
        devices = positive("--devices-per-process", args.devices_per_process)
        command = train_command(args)
        check_layout(command, processes=processes, devices_per_process=devices,
                     what=f"{processes} local process{'es' if processes > 1 else ''}")
    except LaunchError as e:
        print(f"launch.local: error: {e}", file=sys.stderr)
        return 2
    port = free_port() if args.port is None else args.port
    if args.dry_run:
        print("\n".join(plan(command, processes, devices, port)))
        return 0
    return run(command, processes=processes, devices_per_process=devices, port=port)


if __name__ == "__main__":
    sys.exit(main())
