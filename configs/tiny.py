"""A tiny SANA-Sprint-shaped run for tests, demos and CPU smoke runs (random weights).

Variants: `configs/tiny.py` (student: guidance embedding, QK-norm, logvar head; its teacher is the
`:teacher` model), `configs/tiny.py:teacher` (flow teacher: no guidance embedding, no logvar head),
`configs/tiny.py:twinflow` (a TwinFlow student of that teacher: target- and negative-time embeddings),
`configs/tiny.py:s2flash` (the default student distilled by the S2-Flash recipe: 4 steps, conv heads),
`configs/tiny.py:lcm` (rank-4 LoRA adapters on a copy of the teacher, trained alone by latent consistency
distillation: LCM-LoRA), `configs/tiny.py:sd35_flash` (a 2-step student trained by distribution matching
against a fake score, one fake-score update per generator update).
Training reads precomputed records with 8x8x4 latents and 8-token, 32-wide captions from
`data.path` (set it on the command line).
"""

import dataclasses

from s2flash_jax.config import Config, SampleConfig, TrainConfig
from s2flash_jax.data.pipeline import DataConfig
from s2flash_jax.losses.ladd import LADDConfig
from s2flash_jax.losses.lcm import LCMConfig
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.models.lora import ADAPTER_PATTERN
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.precision import Precision
from s2flash_jax.recipes.s2flash import S2FlashConfig
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig
from s2flash_jax.recipes.sd35_flash import SD35FlashConfig
from s2flash_jax.train.state import RANDOM_TEACHER

STUDENT = SanaConfig(
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
    guidance_embeds=True,
    timestep_scale=1.0,
    logvar_head=True,
)
# Sprint conventions: the teacher's SanaPipeline feeds 1000·s·0.001 = s (dense time embedding).
TEACHER = dataclasses.replace(STUDENT, guidance_embeds=False, timestep_scale=0.001, logvar_head=False)
TWINFLOW = dataclasses.replace(TEACHER, twinflow_embeds=True)
MODELS = {None: (STUDENT, TEACHER, "sana_sprint"), "teacher": (TEACHER, None, "flow_matching"),
          "twinflow": (TWINFLOW, TEACHER, "twinflow"), "s2flash": (STUDENT, TEACHER, "s2flash"),
          "lcm": (dataclasses.replace(STUDENT, lora_rank=4, lora_alpha=4.0), TEACHER, "lcm"),
          "sd35_flash": (STUDENT, TEACHER, "sd35_flash")}


def get_config(arg=None):
    if arg not in MODELS:
        raise ValueError(f"unknown variant {arg!r}; expected none, 'teacher', 'twinflow', 's2flash', 'lcm' or 'sd35_flash'")
    model, teacher, recipe = MODELS[arg]
    return Config(
        model=model, teacher=teacher, recipe=recipe,
        precision=Precision(param_dtype="float32", compute_dtype="float32"),
        sample=SampleConfig(steps=4, batch_size=4, height=8, width=8),
        # A smoke config: its distillations start from a random teacher unless given one.
        train=TrainConfig(steps=100, batch_size=8, learning_rate=1e-4, log_every=10, checkpoint_every=50,
                          teacher_checkpoint="" if teacher is None else RANDOM_TEACHER,
                          trainable=(ADAPTER_PATTERN,) if recipe == "lcm" else ()),
        data=DataConfig(caption_length=8),
        # Two teacher blocks: one head on each; warm-up short enough to be seen in a smoke run.
        sana_sprint=SanaSprintConfig(scm=SCMConfig(tangent_warmup_steps=20), ladd=LADDConfig(block_ids=(0, 1))),
        # Lazy R1 every other discriminator update, so a few-step smoke run applies it and skips it.
        s2flash=S2FlashConfig(steps=4, block_ids=(0, 1), r1_every=2, scm=SCMConfig(tangent_warmup_steps=20)),
        lcm=LCMConfig(solver_steps=8),
        sd35_flash=SD35FlashConfig(steps=2, fake_score_updates=1, block_ids=(0, 1)),
    )
