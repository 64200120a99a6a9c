"""Joining the processes of a multi-host job before any other JAX call.

Three ways, in this order:
1. explicit: coordinator address, process count and this process's id (from the config or the
   S2FLASH_COORDINATOR / S2FLASH_NUM_PROCESSES / S2FLASH_PROCESS_ID variables);
2. a cluster JAX recognises from its environment (SLURM with several tasks, Open MPI, TPU pod
   slices): `jax.distributed.initialize()` without arguments reads it;
3. nothing of the above: one process, nothing to join.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

_ENV = {"coordinator_address": "S2FLASH_COORDINATOR", "num_processes": "S2FLASH_NUM_PROCESSES",
        "process_id": "S2FLASH_PROCESS_ID"}
# Variables whose presence with more than one process means a cluster jax.distributed detects.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_TPU_POD_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def resolve(config: DistributedConfig = DistributedConfig(),
            environ: Mapping[str, str] = os.environ) -> tuple[str, DistributedConfig | None]:
    """(how, explicit settings or None): "explicit", "cluster" or "single"."""
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
    if any(int(environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARIABLES) or any(
            v in environ for v in _TPU_POD_VARIABLES):
        return "cluster", None
    return "single", None


def initialize(config: DistributedConfig = DistributedConfig(), environ: Mapping[str, str] = os.environ) -> str:
    """Join the job (see the module docstring); returns how it was joined, for the log."""
    how, explicit = resolve(config, environ)
    if how == "explicit":
        jax.distributed.initialize(explicit.coordinator_address, explicit.num_processes, explicit.process_id)
    elif how == "cluster":
        jax.distributed.initialize()
    return how


def _as_int(variable: str, environ: Mapping[str, str]) -> int:
    try:
        return int(environ[variable])
    except ValueError:
        raise ValueError(f"{variable}={environ[variable]!r} is not an integer") from None
