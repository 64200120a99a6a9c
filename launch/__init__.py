"""Launchers that start `s2flash train` on every host of a multi-host job.

local.py     N processes on this machine, joined by jax.distributed over fake CPU devices (tests)
tpu_pod.py   a Cloud TPU VM slice: create or reuse it, install the package, start every worker
slurm.py     an sbatch script for multi-node GPU jobs (one process per node or per GPU)
gke.py       a JobSet manifest for GKE (TPU slices or GPU node pools)

What they share (the train command line, the variables that join the job, the check that the
config's mesh fits the job) is in job.py; shell quoting and running or printing a script in
shell.py; TPU slice shapes in tpu_slices.py. Each launcher has --dry-run, which prints exactly what
it would run and runs nothing. Run them from the repository root: `python -m launch.local ...`.
See docs/scaling.md.
"""
