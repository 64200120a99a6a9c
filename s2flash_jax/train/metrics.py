"""Training metrics: averaged per logging interval, shown on a progress bar, written to TensorBoard.

Device values are collected without blocking and fetched once per interval, so logging does not
serialise the step pipeline. Only process 0 writes anything.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, for the model-FLOPs-utilisation estimate (vendor spec sheets).
PEAK_FLOPS = {
    "tpu-v4": 275e12, "tpu-v5e": 197e12, "tpu-v5p": 459e12, "tpu-v6e": 918e12,
    "a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12,
}
# Device memory per chip in bytes.
DEVICE_MEMORY = {
    "tpu-v4": 32 << 30, "tpu-v5e": 16 << 30, "tpu-v5p": 95 << 30, "tpu-v6e": 32 << 30,
    "a100": 80 << 30, "h100": 80 << 30, "h200": 141 << 30, "b200": 192 << 30,
}


def device_kind(device: jax.Device) -> str | None:
    """Our name for a device's kind (a key of PEAK_FLOPS), or None for CPUs and unknown chips."""
    kind = device.device_kind.lower().replace(" ", "")
    for tpu, name in (("v5lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v6", "tpu-v6e"),
                      ("v4", "tpu-v4")):
        if "tpu" in kind and tpu in kind:
            return name
    for gpu in ("a100", "h100", "h200", "b200"):
        if gpu in kind:
            return gpu
    return None


class MetricsLogger:
    """Collects per-step metrics; every `every` steps prints their means and writes TensorBoard scalars.

    flops_per_step: {phase: matrix FLOPs of one update on one device} (train.step.compile_ahead)
    for the MFU estimate, which needs a known accelerator (PEAK_FLOPS).
    """

    def __init__(self, logdir: str | Path | None, *, total_steps: int, start_step: int, every: int,
                 examples_per_step: int, flops_per_step: dict[str, float] | None = None, enabled: bool = True):
        self.every, self.examples_per_step = every, examples_per_step
        self.flops_per_step = flops_per_step or {}
        self.enabled = enabled
        kind = device_kind(jax.devices()[0])
        self.peak = PEAK_FLOPS.get(kind) if kind else None
        self.pending: list[tuple[str, dict[str, jax.Array]]] = []
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.writer = self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if logdir is not None:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(str(logdir))
        self.history: list[dict[str, float]] = []

    def record(self, step: int, phase: str, metrics: dict[str, jax.Array]) -> None:
        """step: the global step this update produced (1-based count of updates done)."""
        self.pending.append((phase, metrics))
        if self.bar is not None:
            self.bar.update(1)
        if self.every and step % self.every == 0:
            self.flush(step)

    def flush(self, step: int) -> dict[str, float] | None:
        if not self.pending:
            return None
        fetched = jax.device_get(self.pending)  # blocks until the interval's steps are done
        elapsed = time.perf_counter() - self.last_time
        steps = step - self.last_step
        sums, counts = defaultdict(float), defaultdict(int)
        flops = 0.0
        for phase, metrics in fetched:
            flops += self.flops_per_step.get(phase, 0.0)
            for key, value in metrics.items():
                sums[key] += float(np.asarray(value))
                counts[key] += 1
        means = {key: sums[key] / counts[key] for key in sums}
        means["perf/step_time_s"] = elapsed / max(steps, 1)
        means["perf/examples_per_s"] = steps * self.examples_per_step / max(elapsed, 1e-9)
        if self.peak and flops:
            means["perf/mfu"] = flops / (elapsed * self.peak)
        if "skipped_updates" in means:  # a running total, not a per-step value
            means["skipped_updates"] = float(np.asarray(fetched[-1][1]["skipped_updates"]))
        self.pending.clear()
        self.last_time, self.last_step = time.perf_counter(), step
        self.history.append({"step": step, **means})
        if self.enabled:
            if self.writer is not None:
                for key, value in means.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()
            shown = {key.split("/")[0]: f"{value:.4g}" for key, value in means.items() if key.endswith("/loss")}
            shown["examples/s"] = f"{means['perf/examples_per_s']:.4g}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(means.items())))
        return means

    def close(self, step: int) -> None:
        self.flush(step)
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
