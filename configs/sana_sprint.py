"""SANA-Sprint 0.6B / 1.6B transformers at 1024 px (32x32 DC-AE f32c32 latents).

Values as `scripts/convert_sana_to_diffusers.py` writes them for SanaSprint_600M_P1_D28 and
SanaSprint_1600M_P1_D20 (see shared/reference/sana_sprint.md section 2.1).

Variants (comma-separated): `0.6b` or `1.6b` (default 1.6b), and `teacher` for the flow-matching
teacher the student is distilled from (same architecture without the guidance embedding and logvar
head, dense time embedding via timestep_scale=0.001). Example: configs/sana_sprint.py:0.6b,teacher
"""

import dataclasses

from s2flash_jax.config import Config, SampleConfig, TrainConfig
from s2flash_jax.data.pipeline import DataConfig
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.precision import Precision
from s2flash_jax.train.health import HealthConfig

SIZES = {
    # heads x 32 = width; cross heads x cross head dim = width
    "0.6b": dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16, cross_attention_head_dim=72),
    "1.6b": dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112),
}


def get_config(arg=None):
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in SIZES and t != "teacher"]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected one of {sorted(SIZES)} and/or 'teacher'")
    sizes = [t for t in tokens if t in SIZES]
    size = sizes[-1] if sizes else "1.6b"
    shape = SIZES[size]
    student = SanaConfig(
        in_channels=32,
        out_channels=32,
        attention_head_dim=32,
        cross_attention_dim=shape["num_attention_heads"] * 32,
        caption_channels=2304,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=True,
        guidance_embeds_scale=0.1,
        timestep_scale=1.0,
        logvar_head=True,
        gradient_checkpointing=True,
        **shape,
    )
    teacher = dataclasses.replace(student, guidance_embeds=False, timestep_scale=0.001, logvar_head=False)
    return Config(
        model=teacher if "teacher" in tokens else student,
        teacher=None if "teacher" in tokens else teacher,
        precision=Precision(param_dtype="float32", compute_dtype="bfloat16"),
        sample=SampleConfig(steps=2, batch_size=1, height=32, width=32),
        # The yamls: CAME 2e-6 with 5000 warm-up steps then constant, clip 0.1, 16 per GPU (here global).
        train=TrainConfig(batch_size=128, learning_rate=2e-6, warmup_steps=5000, clip_norm=0.1,
                          checkpoint_every=500, sample_every=500, teacher_dtype="bfloat16"),
        data=DataConfig(caption_length=300),
        # SANA samples 1024 px with flow_shift 3: the teacher's reference solution does too.
        health=HealthConfig(every=500, teacher_flow_shift=3.0),
    )
