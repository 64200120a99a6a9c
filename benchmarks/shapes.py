"""The shapes the side-by-side benchmarks run at, chosen by platform.

On a CPU: the tiny SANA-Sprint configs (width 64, 2 layers, 16x16 latents, float32), where a
step takes well under a second. On a GPU or TPU: SANA-Sprint 0.6B (width 1152, 28 layers) at
1024 px (32x32 DC-AE latents, 300-token captions), training in float32 against the float32 PyTorch
reference and sampling in bfloat16. "smoke" is the smallest that runs every code path (tests).
"""

from __future__ import annotations

import dataclasses

import jax

from s2flash_jax.config import load_config
from s2flash_jax.models.sana import SanaConfig


@dataclasses.dataclass(frozen=True)
class Shapes:
    name: str
    config: str  # the config whose model (student) and teacher are benchmarked
    layers: int | None  # None: the config's
    train_batch: int  # examples per update (at least 8: one BatchNormLocal group of the LADD heads)
    latent_size: int  # latent height = width (x32 pixels with DC-AE f32)
    caption_length: int
    sample_batch: int
    sample_dtype: str  # float32 or bfloat16, both frameworks' weights and compute

    def describe(self) -> str:
        student, _ = model_pair(self)
        pixels = f" ({self.latent_size * 32} px)" if student.in_channels == 32 else ""  # DC-AE f32c32 latents
        return (f"{self.config} width {student.inner_dim}, {student.num_layers} layers, {self.latent_size}x"
                f"{self.latent_size} latents{pixels}, caption {self.caption_length}")


PRESETS = {
    "smoke": Shapes("smoke", "configs/tiny.py", layers=1, train_batch=8, latent_size=8, caption_length=8,
                    sample_batch=1, sample_dtype="float32"),
    "cpu": Shapes("cpu", "configs/tiny.py", layers=2, train_batch=8, latent_size=16, caption_length=16,
                  sample_batch=1, sample_dtype="float32"),
    "accelerator": Shapes("accelerator", "configs/sana_sprint.py:0.6b", layers=None, train_batch=4, latent_size=32,
                          caption_length=300, sample_batch=1, sample_dtype="bfloat16"),
}


def choose(name: str = "auto") -> Shapes:
    """A preset by name; "auto": "cpu" on a CPU backend, "accelerator" on GPU or TPU."""
    if name == "auto":
        name = "cpu" if jax.default_backend() == "cpu" else "accelerator"
    if name not in PRESETS:
        raise ValueError(f"shapes {name!r}; expected auto or one of {sorted(PRESETS)}")
    return PRESETS[name]


def model_pair(shapes: Shapes) -> tuple[SanaConfig, SanaConfig]:
    """(student with the logvar head, teacher) of the preset's config, without gradient
    checkpointing (the PyTorch reference has none, and the FLOP count is then model FLOPs)."""
    config = load_config(shapes.config)
    layers = {} if shapes.layers is None else {"num_layers": shapes.layers}
    student = dataclasses.replace(config.model, logvar_head=True, gradient_checkpointing=False, **layers)
    teacher = dataclasses.replace(config.teacher, gradient_checkpointing=False, **layers)
    return student, teacher
