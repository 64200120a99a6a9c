"""A tiny SANA-Sprint-shaped transformer for tests, demos and CPU smoke runs (random weights).

Variants: `configs/tiny.py` (student: guidance embedding, QK-norm, logvar head),
`configs/tiny.py:teacher` (flow teacher: no guidance embedding, no logvar head).
"""

from s2flash_jax.config import Config, SampleConfig
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.precision import Precision


def get_config(arg=None):
    if arg not in (None, "teacher"):
        raise ValueError(f"unknown variant {arg!r}; expected none or 'teacher'")
    student = arg is None
    model = SanaConfig(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=16,
        cross_attention_dim=64,
        caption_channels=32,
        mlp_ratio=2.5,
        sample_size=8,
        patch_size=1,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=student,
        # Sprint conventions: the teacher's SanaPipeline feeds 1000·s·0.001 = s (dense time embedding).
        timestep_scale=1.0 if student else 0.001,
        logvar_head=student,
    )
    return Config(
        model=model,
        precision=Precision(param_dtype="float32", compute_dtype="float32"),
        sample=SampleConfig(steps=4, batch_size=4, height=8, width=8),
    )
