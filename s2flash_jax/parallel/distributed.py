"""Joining the processes of a multi-host job before any other JAX call.

Three ways, in this order:
1. explicit: coordinator address, process count and this process's id (from the config or the
   S2FLASH_COORDINATOR / S2FLASH_NUM_PROCESSES / S2FLASH_PROCESS_ID variables), as the launchers set;
2. a cluster JAX itself recognises: a Cloud TPU VM slice (from the GCE metadata server, as on a pod
   launched with `gcloud compute tpus tpu-vm ssh --worker=all --command "s2flash train ..."`), a TPU
   GKE pod, a SLURM job step, Open MPI's mpirun. The decision is JAX's own (its ClusterEnv
   registry, the code `jax.distributed.initialize()` without arguments runs), so "cluster" here means
   exactly the environments that call can join; recognising any fewer is how a pod ends up as N
   one-host jobs, any more how a lone process waits for a coordinator that never comes;
3. nothing of the above: one process, nothing to join.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import jax

_ENV = {"coordinator_address": "S2FLASH_COORDINATOR", "num_processes": "S2FLASH_NUM_PROCESSES",
        "process_id": "S2FLASH_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def detected_cluster() -> str | None:
    """The name of the cluster environment `jax.distributed.initialize()` would join (JAX's
    ClusterEnv names: "gcetpu", "gketpu", "slurm", "ompi", "k8s"), or None. Reads os.environ (and, on
    a Cloud TPU VM, the GCE metadata server) as JAX does."""
    from jax._src.clusters import ClusterEnv  # JAX has no public API for "which cluster am I in"

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name
    return None


def resolve(config: DistributedConfig = DistributedConfig(), environ: Mapping[str, str] = os.environ,
            detect: Callable[[], str | None] = detected_cluster) -> tuple[str, DistributedConfig | None]:
    """(how, explicit settings or None): "explicit", "cluster:<name>" or "single"."""
    values = {field: getattr(config, field) for field in _ENV}
    for field, variable in _ENV.items():
        if values[field] is None and variable in environ:
            values[field] = environ[variable] if field == "coordinator_address" else _as_int(variable, environ)
    given = [field for field, value in values.items() if value is not None]
    if given:
        missing = [f"{field} ({_ENV[field]})" for field in _ENV if values[field] is None]
        if missing:
            raise ValueError(f"multi-process settings are incomplete: {', '.join(given)} given but "
                             f"{', '.join(missing)} missing")
        if not 0 <= values["process_id"] < values["num_processes"]:
            raise ValueError(f"process_id={values['process_id']} must be in [0, {values['num_processes']})")
        return "explicit", DistributedConfig(**values)
    cluster = detect()
    return (f"cluster:{cluster}", None) if cluster else ("single", None)


def initialize(config: DistributedConfig = DistributedConfig(), environ: Mapping[str, str] = os.environ) -> str:
    """Join the job (see the module docstring); returns how it was joined, for the log."""
    how, explicit = resolve(config, environ)
    if how == "explicit":
        jax.distributed.initialize(explicit.coordinator_address, explicit.num_processes, explicit.process_id)
    elif how.startswith("cluster:"):
        jax.distributed.initialize()
    return how


def describe(how: str) -> str:
    """One log line: how the job was joined and this process's place in it."""
    if how == "single":
        return "one process (no multi-host job detected)"
    source = "S2FLASH_* settings" if how == "explicit" else f"the {how.partition(':')[2]} environment"
    return f"process {jax.process_index()} of {jax.process_count()}, joined from {source}"


def _as_int(variable: str, environ: Mapping[str, str]) -> int:
    try:
        return int(environ[variable])
    except ValueError:
        raise ValueError(f"{variable}={environ[variable]!r} is not an integer") from None
