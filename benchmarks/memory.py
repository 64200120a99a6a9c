"""Peak memory of a training step, measured the same way on both sides where the platform allows.

On a GPU both frameworks' allocators count every byte they hand out: JAX's `peak_bytes_in_use`
and torch's `max_memory_allocated`, each over the whole benchmark process (weights, optimizer
state, batch, step temporaries). On a CPU neither has allocator statistics, so each side is
counted from what it knows exactly: JAX from XLA's buffer assignment of the compiled step
(arguments + temporaries + outputs not written in place, as `s2flash plan` counts it), torch from
the bytes live before the step plus the highest point of its allocations during the step, from the
profiler's memory events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import jax
import torch

from s2flash_jax.train.step import step_peak_bytes

CPU_JAX = "XLA buffer assignment of the compiled steps (arguments + temporaries + outputs)"
CPU_TORCH = "tensors live before the steps + peak of the profiler's allocation events during them"
ACCELERATOR_JAX = "allocator peak (jax memory_stats peak_bytes_in_use)"
CUDA_TORCH = "allocator peak (torch.cuda.max_memory_allocated)"


def jax_peak_bytes(compiled_steps: Iterable[jax.stages.Compiled]) -> tuple[int, str]:
    """(peak bytes on device 0, how it was measured) for a benchmark that ran these steps."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), ACCELERATOR_JAX
    return max(step_peak_bytes(compiled) for compiled in compiled_steps), CPU_JAX


def tensor_bytes(modules: Iterable[torch.nn.Module] = (), tensors: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers and the tensors."""
    storages = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class TorchPeak:
    """`with TorchPeak(device, live_before) as peak: steps()` then `peak.bytes`, `peak.how`.

    live_before: bytes already live (CPU only; see tensor_bytes); allocations made inside the block
    and still live after it (lazily created optimizer state) count toward the peak."""

    def __init__(self, device: str, live_before: int = 0):
        self.device, self.live_before = torch.device(device), live_before
        self.bytes, self.how = 0, ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TorchPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = self._stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes, self.how = torch.cuda.max_memory_allocated(self.device), CUDA_TORCH
            return
        self._stack.close()
        if exc[0] is None:
            current = highest = 0
            for event in sorted(self._profile.events(), key=lambda e: e.time_range.start):
                current += event.self_cpu_memory_usage
                highest = max(highest, current)
            self.bytes, self.how = self.live_before + highest, CPU_TORCH
