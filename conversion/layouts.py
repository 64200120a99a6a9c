"""How one PyTorch tensor is laid out as one JAX parameter, and back.

Every transpose/reshape between the two frameworks is one of these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import einops
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from the JAX shape


COPY = Layout("copy", lambda w: w, lambda a: a, lambda s: s)
# nn.Linear weight [out, in] <-> Dense kernel [in, out]
LINEAR = Layout("linear", lambda w: w.T, lambda a: a.T, lambda s: s[::-1])
# 1x1 nn.Conv2d weight [out, in, 1, 1] <-> Dense kernel [in, out] over tokens
CONV1X1 = Layout(
    "conv1x1",
    lambda w: einops.rearrange(w, "o i 1 1 -> i o"),
    lambda a: einops.rearrange(a, "i o -> o i 1 1"),
    lambda s: (s[1], s[0], 1, 1),
)
# depthwise nn.Conv2d weight [C, 1, kh, kw] (OIHW) <-> nnx.Conv kernel [kh, kw, 1, C] (HWIO)
DEPTHWISE = Layout(
    "depthwise",
    lambda w: einops.rearrange(w, "c one h w -> h w one c"),
    lambda a: einops.rearrange(a, "h w one c -> c one h w"),
    lambda s: (s[3], s[2], s[0], s[1]),
)


def patch_conv(patch: int) -> Layout:
    """p x p stride-p nn.Conv2d weight [D, C, p, p] <-> Dense kernel [(p p C), D] over flattened patches."""
    return Layout(
        f"patch_conv{patch}",
        lambda w: einops.rearrange(w, "d c p q -> (p q c) d"),
        lambda a: einops.rearrange(a, "(p q c) d -> d c p q", p=patch, q=patch),
        lambda s: (s[1], s[0] // (patch * patch), patch, patch),
    )
