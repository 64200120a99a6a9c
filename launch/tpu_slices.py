"""Cloud TPU slice shapes: from an accelerator type such as "v5litepod-16" to its hosts and devices.

The number in a v4 / v5p type counts TensorCores, two per chip, and JAX sees one device per chip
(a megacore); in v5e ("v5litepod") and v6e types it counts chips. Multi-host slices have 4 chips
per host; v5e and v6e slices of up to 8 chips are one host. Values from Cloud TPU's documentation
of each generation (system architecture pages) and GKE's TPU topology tables.
"""

from __future__ import annotations

import dataclasses
import re

from launch.job import LaunchError


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # as it starts the accelerator type
    cores_per_chip: int  # what the type's number counts per chip
    single_host_chips: int  # the largest slice that is one host
    runtime_version: str  # a TPU VM software version for `gcloud compute tpus tpu-vm create`
    gke_accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
    gke_topologies: dict[int, str]  # chips -> GKE node label cloud.google.com/gke-tpu-topology


_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8"}
GENERATIONS = {
    "v4": Generation("v4", 2, 4, "tpu-ubuntu2204-base", "tpu-v4-podslice", _TOPOLOGY_3D),
    "v5litepod": Generation("v5litepod", 1, 8, "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", _TOPOLOGY_2D),
    "v5p": Generation("v5p", 2, 4, "v2-alpha-tpuv5", "tpu-v5p-slice", _TOPOLOGY_3D),
    "v6e": Generation("v6e", 1, 8, "v2-alpha-tpuv6e", "tpu-v6e-slice", _TOPOLOGY_2D),
}
CHIPS_PER_HOST = 4  # in multi-host slices of every generation above


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    accelerator_type: str
    generation: Generation
    chips: int
    hosts: int

    @property
    def devices_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def gke_topology(self) -> str:
        return self.generation.gke_topologies[self.chips]

    def describe(self) -> str:
        return f"{self.hosts} host{'s' if self.hosts > 1 else ''} of {self.accelerator_type}"


def tpu_slice(accelerator_type: str) -> TpuSlice:
    """"v4-32" -> 16 chips on 4 hosts. Errors name the known generations and sizes."""
    match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", accelerator_type)
    if not match:
        raise LaunchError(f"TPU accelerator type {accelerator_type!r}; expected one of "
                          f"{', '.join(g + '-N' for g in GENERATIONS)} (e.g. v5litepod-16, v5p-128)")
    generation = GENERATIONS[match[1]]
    number = int(match[2])
    chips = number // generation.cores_per_chip
    if number % generation.cores_per_chip or chips not in generation.gke_topologies:
        sizes = sorted(c * generation.cores_per_chip for c in generation.gke_topologies)
        raise LaunchError(f"TPU accelerator type {accelerator_type!r}: {generation.prefix} slices come in sizes "
                          f"{sizes}")
    hosts = 1 if chips <= generation.single_host_chips else chips // CHIPS_PER_HOST
    return TpuSlice(accelerator_type, generation, chips, hosts)
