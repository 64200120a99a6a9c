"""What every launcher shares: the `s2flash train` command line, the variables that join the
processes into one job, and the check that the config's mesh and batch fit the job's devices.

`s2flash train` joins a multi-process job from S2FLASH_COORDINATOR (host:port of process 0),
S2FLASH_NUM_PROCESSES and S2FLASH_PROCESS_ID (s2flash_jax/parallel/distributed.py). Every
launcher sets these three explicitly rather than relying on cluster auto-detection, so the same
command joins the same way on a TPU VM slice, GKE, SLURM or one machine.

Every launcher passes `--resume`: on an empty or missing run directory it starts a fresh run, on
an existing one it continues from the newest checkpoint, so relaunching a preempted job is the
same command as launching it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

COORDINATOR = "S2FLASH_COORDINATOR"
NUM_PROCESSES = "S2FLASH_NUM_PROCESSES"
PROCESS_ID = "S2FLASH_PROCESS_ID"


class LaunchError(ValueError):
    """A launch that cannot work as asked; the message says what is wrong and what was expected."""


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """`s2flash train` as every process of the job runs it.

    config: configs/x.py[:variant], a path the hosts resolve from their working directory.
    out: the run directory, on storage every host sees (checkpoints are written by all processes).
    python: the interpreter on the hosts; the CLI runs as `python -m s2flash_jax.cli`, which needs
    no `s2flash` script on PATH.
    """

    config: str
    out: str
    overrides: tuple[str, ...] = ()
    python: str = "python"

    def argv(self) -> list[str]:
        return [self.python, "-m", "s2flash_jax.cli", "train", "--config", self.config, "--out", self.out,
                "--resume", *self.overrides]


def join_env(coordinator: str, num_processes: int | str, process_id: int | str) -> dict[str, str]:
    """The variables `s2flash train` joins a job from. Values may be shell expressions evaluated on
    the host (e.g. "$SLURM_PROCID") where the launcher renders a script."""
    values = (coordinator, num_processes, process_id)
    # str subclasses (launch.shell.Expr) are kept as they are: str() would drop the marking.
    return {name: value if isinstance(value, str) else str(value)
            for name, value in zip((COORDINATOR, NUM_PROCESSES, PROCESS_ID), values, strict=True)}


def add_train_arguments(parser: argparse.ArgumentParser, *, python: str) -> None:
    """--config, --out, --mesh, --dry-run and trailing KEY=VALUE overrides, as `s2flash train` takes them."""
    parser.add_argument("--config", required=True,
                        help="config file with optional variant, e.g. configs/sana_sprint.py:0.6b")
    parser.add_argument("--out", required=True, help="run directory, on storage every host can read and write")
    parser.add_argument("--mesh", default="", metavar="data=..,fsdp=..,tensor=..",
                        help="mesh axis sizes over all the job's devices (one may be -1); unset axes keep the config's")
    parser.add_argument("--python", default=python, help=f"Python interpreter on the hosts (default: {python})")
    parser.add_argument("--dry-run", action="store_true", help="print exactly what would run, run nothing")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides passed to every process, e.g. train.steps=1000 data.path=/data")


def train_command(args: argparse.Namespace) -> TrainCommand:
    from s2flash_jax.cli import mesh_overrides

    return TrainCommand(config=args.config, out=args.out,
                        overrides=(*args.overrides, *mesh_overrides(args.mesh)), python=args.python)


def check_layout(command: TrainCommand, *, processes: int, devices_per_process: int, what: str) -> None:
    """Load the config with its overrides (here, before any host is started) and check that its mesh
    lays out processes x devices_per_process devices and that its global batch splits evenly over
    them. what: the launcher's description of the job, for the message (e.g. "4 hosts of v4-32")."""
    from s2flash_jax.config import ConfigError, load_config
    from s2flash_jax.parallel.mesh import MeshError

    try:
        config = load_config(command.config, command.overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    devices = processes * devices_per_process
    try:
        data, fsdp, tensor = config.mesh.shape(devices)
    except MeshError as e:
        raise LaunchError(f"{e}: the job ({what}) has {processes} processes x {devices_per_process} devices = "
                          f"{devices}; pass --mesh (or mesh.* overrides) whose sizes multiply to {devices}, "
                          f"e.g. --mesh data=-1") from None
    batch, shards = config.train.batch_size, data * fsdp
    if batch % shards or batch % processes:
        raise LaunchError(f"train.batch_size={batch} does not split evenly over the {shards} data x fsdp devices "
                          f"(mesh data={data} fsdp={fsdp} tensor={tensor}) and the {processes} processes of the job "
                          f"({what}); expected a multiple of {math.lcm(shards, processes)}")


def positive(name: str, value: int) -> int:
    if value < 1:
        raise LaunchError(f"{name}={value}; expected a positive count")
    return value
