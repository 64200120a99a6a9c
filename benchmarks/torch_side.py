"""Where the PyTorch reference of a side-by-side benchmark runs, and timing its calls honestly."""

from __future__ import annotations

import jax
import torch


def torch_device() -> str | None:
    """The GPU next to JAX's, the CPU next to JAX's CPU, or None where there is no reference (TPU)."""
    platform = jax.default_backend()
    if platform == "gpu":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu" if platform == "cpu" else None


def synchronised(call, device: str):
    """`call` made to return only when its CUDA work is done (CUDA launches are asynchronous)."""
    if device != "cuda":
        return call

    def run():
        result = call()
        torch.cuda.synchronize()
        return result

    return run
