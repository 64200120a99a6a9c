"""A SLURM batch job for multi-node GPU training: an sbatch script that starts `s2flash train` in
every task, one process per node (it drives all the node's GPUs) or one per GPU.

    python -m launch.slurm --nodes 4 --gpus-per-node 8 [--process-per node|gpu] [--partition P] \
        [--time 24:00:00] [--account A] [--setup 'source .venv/bin/activate'] \
        --config configs/sana_sprint.py:1.6b --out /shared/runs/sprint data.path=/shared/data [--dry-run]

The script is piped into `sbatch`; --dry-run prints it and submits nothing (`... --dry-run | sbatch`
is the same submission). In the job, the first node of the allocation runs process 0 and
coordinates, on a port derived from the job id (as jax.distributed's own SLURM detection does, so
jobs sharing a node do not collide); every task gets S2FLASH_PROCESS_ID=$SLURM_PROCID, and with
one process per GPU also CUDA_VISIBLE_DEVICES=$SLURM_LOCALID, so each process sees only its GPU.
The job asks to be requeued on preemption (--requeue) and the train command has --resume, so a
requeued job continues from its newest checkpoint. The working directory (--workdir, default the
current one) must be on a filesystem every node mounts, as must the run directory and data.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.job import LaunchError, TrainCommand, add_train_arguments, check_layout, join_env, positive, train_command
from launch.shell import SCRIPT_HEADER, Expr, command_line, quote, submit

PROCESS_PER = ("node", "gpu")
# The first node of the allocation, and a port in [61440, 65535] from the job id.
COORDINATOR_ADDRESS = Expr('$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
                           ':$((SLURM_JOB_ID % 4096 + 61440))')


def tasks_per_node(process_per: str, gpus_per_node: int) -> int:
    if process_per not in PROCESS_PER:
        raise LaunchError(f"--process-per {process_per!r}; expected one of {PROCESS_PER}")
    return 1 if process_per == "node" else gpus_per_node


def task_command(command: TrainCommand, num_processes: int, process_per: str) -> str:
    """What each task runs: the job's join variables (its id from SLURM) and the train command."""
    env = join_env(Expr("$COORDINATOR"), num_processes, Expr("$SLURM_PROCID"))
    if process_per == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = Expr("$SLURM_LOCALID")
    return command_line(command.argv(), env)


def render(command: TrainCommand, *, nodes: int, gpus_per_node: int, process_per: str = "node",
           workdir: str, job_name: str = "s2flash-train", partition: str | None = None, time: str | None = None,
           account: str | None = None, setup: str = "", sbatch_options: tuple[str, ...] = ()) -> str:
    per_node = tasks_per_node(process_per, gpus_per_node)
    options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
               f"--gpus-per-node={gpus_per_node}", "--requeue", "--open-mode=append", "--output=%x-%j.out",
               *([f"--partition={partition}"] if partition else []), *([f"--time={time}"] if time else []),
               *([f"--account={account}"] if account else []), *sbatch_options]
    num_processes = nodes * per_node
    lines = [SCRIPT_HEADER.splitlines()[0],  # #SBATCH lines must come before any command
             *(f"#SBATCH {option}" for option in options),
             "# rendered by launch.slurm, submitted with sbatch",
             SCRIPT_HEADER.splitlines()[1],
             f"cd {quote(workdir)}",
             *([setup] if setup else []),
             f"# {num_processes} processes ({per_node} per node); process 0 on the first node coordinates",
             f"export COORDINATOR={quote(COORDINATOR_ADDRESS)}",
             f"srun --kill-on-bad-exit=1 bash -c {quote(task_command(command, num_processes, process_per))}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--process-per", choices=PROCESS_PER, default="node",
                        help="one process per node driving all its GPUs (default), or one per GPU")
    parser.add_argument("--job-name", default="s2flash-train")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    parser.add_argument("--account", default=None)
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch-option=--constraint=h100 (repeatable)")
    parser.add_argument("--workdir", default=os.getcwd(), help="directory the tasks run in (default: this one)")
    parser.add_argument("--setup", default="", help="shell line run before srun, e.g. 'source .venv/bin/activate'")
    add_train_arguments(parser, python="python")
    args = parser.parse_args(argv)
    try:
        nodes, gpus = positive("--nodes", args.nodes), positive("--gpus-per-node", args.gpus_per_node)
        per_node = tasks_per_node(args.process_per, gpus)
        command = train_command(args)
        check_layout(command, processes=nodes * per_node, devices_per_process=gpus // per_node,
                     what=f"{nodes} node{'s' if nodes > 1 else ''}, one process per {args.process_per}")
    except LaunchError as e:
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 2
    script = render(command, nodes=nodes, gpus_per_node=gpus, process_per=args.process_per, workdir=args.workdir,
                    job_name=args.job_name, partition=args.partition, time=args.time, account=args.account,
                    setup=args.setup, sbatch_options=tuple(args.sbatch_option))
    return submit(script, ["sbatch"], dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
