"""The built-in shapes demo (`s2flash demo`): a SANA-architecture teacher and its SANA-Sprint student
on 32x32 procedural shape images, sized to run end to end on a laptop CPU.

Variants: `configs/shapes.py` distils the student (sCM + LADD) from `train.teacher_checkpoint`;
`configs/shapes.py:tbcm` distils it image-free on the teacher's trajectories (TBCM, prompts only);
`configs/shapes.py:twinflow` turns a copy of the teacher into a few-step model (TwinFlow, no teacher);
`configs/shapes.py:s2flash` distils an 8-step student adversarially (S2-Flash: conv heads on the teacher's
blocks, R1, sCM on the step set); `configs/shapes.py:lcm` trains LoRA adapters on a copy of the teacher
with latent consistency distillation (the LCM-LoRA baseline S2-Flash is compared with);
`configs/shapes.py:sd35` trains a 4-step student by distribution matching against a fake score with timestep
sharing, then adds an adversary on its intermediate states (SD3.5-Flash's two stages);
`configs/shapes.py:teacher` trains the teacher with flow matching (`:teacher,legacy`: in base
SANA's conventions, no QK-norm and the time embedder fed 1000·s); `configs/shapes.py:prepare`
turns such a teacher into a Sprint teacher (`s2flash prepare-teacher`); add `,quick` to any for the
short run the tests use. Latents are the lossless space-to-depth "autoencoder" of the images
(factor 2: 16x16x12), captions the frozen word-level text encoder's 20 x 64 embeddings; `s2flash
demo` writes both into the run's data directory and sets `data.path`.

Why these choices (measured on the held-out prompts, 600 teacher steps):
- Factor 2, not 4: a token of 48 latent channels in a 64-wide model leaves no room beside the
  noise for the position embedding, and at pure noise the teacher placed objects anywhere
  (position accuracy 8%); with 12 channels per token it is 75%. (SANA itself has 32 channels in a
  1152-wide model.) It costs 4x the tokens.
- Flow time s = sigmoid(2 + n), most of it near pure noise: the objects are small and bright, so
  at SANA's sigmoid(n) they are already visible in x_s and the text is never needed to place them
  (colour accuracy 57% -> 97%). Sampling warps the schedule the same way (flow_shift 3).
- The student is distilled and sampled where that teacher was trained: sCM times centred on the
  teacher's noise-to-signal ratio (log tan t ~ N(2.0, 1.6), p_mean 1.3 = 2.0 + ln σ_d; the
  discriminator's shifted by the same ln 3 as sampling), and its 2 and 4-step times moved towards
  noise (flow_shift 6). At SANA's p_mean 0.2 and uniform times, the 4-step student visited noise
  levels the teacher had hardly seen and scored 81% of the teacher; here 101% (160 student steps).
- Guidance scale 2, not 3 (`benchmarks/sprint_shapes_sweep.py`, docs/images/sprint-shapes-sweep.md; one
  teacher, 1200 steps): its 20-step samples score 60.9% / Fréchet 25.6 at 2 against 56.6% / 36.0 at
  3, whose amplified cond − uncond difference leaves a grain the student inherits (1-step Fréchet
  25.7 against 27.4 at equal accuracy). 1.5 has the lowest Fréchet distances and 2 the best accuracy.
"""

import dataclasses
import math

from s2flash_jax.config import Config, PrepareTeacherConfig, SampleConfig, TrainConfig
from s2flash_jax.data.pipeline import DataConfig
from s2flash_jax.losses.ladd import LADDConfig
from s2flash_jax.losses.lcm import LCMConfig
from s2flash_jax.losses.scm import SCMConfig
from s2flash_jax.losses.twinflow import TwinFlowConfig
from s2flash_jax.models.lora import ADAPTER_PATTERN
from s2flash_jax.models.sana import SanaConfig
from s2flash_jax.precision import Precision
from s2flash_jax.recipes.flow_matching import FlowMatchingConfig
from s2flash_jax.recipes.s2flash import S2FlashConfig
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig
from s2flash_jax.recipes.sd35_flash import SD35FlashConfig
from s2flash_jax.recipes.tbcm import TBCMConfig
from s2flash_jax.train.health import HealthConfig

AUTOENCODER_FACTOR = 2
IMAGE_SIZE = 32
CAPTION_LENGTH = 20
CAPTION_WIDTH = 64
GUIDANCE_SCALE = 2.0
FLOW_SHIFT = 3.0
STUDENT_FLOW_SHIFT = 6.0
TEACHER_SAMPLING_STEPS = 20  # the demo samples the teacher with 20 guided Euler steps

TEACHER = SanaConfig(
    in_channels=3 * AUTOENCODER_FACTOR**2,
    out_channels=3 * AUTOENCODER_FACTOR**2,
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=32,
    cross_attention_dim=64,
    caption_channels=CAPTION_WIDTH,
    mlp_ratio=2.5,
    sample_size=IMAGE_SIZE // AUTOENCODER_FACTOR,
    patch_size=1,
    # Sin-cos position embeddings: two blocks of 3x3 depthwise convs alone cannot tell a token where
    # on the 16x16 grid it is, and every prompt names positions.
    interpolation_scale=1.0,
    qk_norm="rms_norm_across_heads",
    guidance_embeds=False,
    scan_unroll=2,  # both blocks in one fused body: ~30% faster on CPU
    timestep_scale=0.001,  # the Sprint teacher's dense time embedding: the embedder sees s itself
)
STUDENT = dataclasses.replace(TEACHER, guidance_embeds=True, timestep_scale=1.0, logvar_head=True)
TWINFLOW = dataclasses.replace(TEACHER, twinflow_embeds=True)
LEGACY_TEACHER = dataclasses.replace(TEACHER, qk_norm=None, timestep_scale=1.0)  # base SANA's conventions

# (teacher steps, student steps) for the full demo and for --quick.
STEPS = {"full": (1200, 160), "quick": (100, 20)}


def get_config(arg=None):
    tokens = [t for t in (arg or "").split(",") if t]
    recipes = {"teacher", "tbcm", "twinflow", "s2flash", "lcm", "sd35", "prepare"}
    if set(tokens) - recipes - {"quick", "legacy"} or len(set(tokens) & recipes) > 1 or (
            "legacy" in tokens and "teacher" not in tokens):
        raise ValueError(f"variant {arg!r}: expected at most one of 'teacher' (optionally with 'legacy') / 'tbcm' / "
                         "'twinflow' / 's2flash' / 'lcm' / 'sd35' / 'prepare', and/or 'quick'")
    teacher_steps, student_steps = STEPS["quick" if "quick" in tokens else "full"]
    batch_size = 8 if "quick" in tokens else 32  # --quick only checks that every stage runs
    train = dict(batch_size=batch_size, optimizer="adamw", clip_norm=1.0, ema_decay=0.99, log_every=50,
                 checkpoint_every=500, keep_checkpoints=1)
    common = dict(
        precision=Precision(param_dtype="float32", compute_dtype="float32"),
        sample=SampleConfig(steps=1, batch_size=4, height=TEACHER.sample_size, width=TEACHER.sample_size,
                            guidance_scale=GUIDANCE_SCALE, flow_shift=FLOW_SHIFT),
        data=DataConfig(caption_length=CAPTION_LENGTH),
    )
    if "prepare" in tokens:
        # Fine-tuning a trained teacher into the Sprint conventions: a tenth of the teacher's
        # learning rate, the time embedding and new norms first, then everything.
        quick = "quick" in tokens
        return Config(model=TEACHER, recipe="flow_matching",
                      flow_matching=FlowMatchingConfig(time_mean=2.0, caption_dropout=0.1),
                      train=TrainConfig(steps=1, learning_rate=3e-4, warmup_steps=20 if quick else 50,
                                        schedule="cosine", end_learning_rate=1e-5, **train),
                      prepare_teacher=PrepareTeacherConfig(embedding_steps=20 if quick else 200,
                                                           full_steps=40 if quick else 400,
                                                           full_warmup_steps=10 if quick else 100),
                      **common)
    if "teacher" in tokens:
        return Config(model=LEGACY_TEACHER if "legacy" in tokens else TEACHER, recipe="flow_matching", flow_matching=FlowMatchingConfig(time_mean=2.0, caption_dropout=0.1),
                      train=TrainConfig(steps=teacher_steps, learning_rate=3e-3, schedule="cosine",
                                        warmup_steps=min(100, teacher_steps // 10), end_learning_rate=1e-5, **train),
                      **common)
    # Distillation health (train/health.py) five times a run; --quick only checks that stages run.
    common["health"] = HealthConfig(every=0 if "quick" in tokens else student_steps // 4, teacher_flow_shift=FLOW_SHIFT)
    if "twinflow" in tokens:
        # No teacher: the student starts as the flow model itself and is its own target (EMA). Guidance is
        # baked in, target + ratio·(cond − uncond): ratio GUIDANCE_SCALE − 1 is the teacher's scale when the EMA
        # is the flow model. Sampled on the teacher's own shifted schedule.
        return Config(
            model=TWINFLOW, teacher=TEACHER, recipe="twinflow",
            train=TrainConfig(steps=student_steps, learning_rate=2e-4, warmup_steps=min(50, student_steps // 10),
                              **train),
            twinflow=TwinFlowConfig(guidance_ratio=GUIDANCE_SCALE - 1.0),
            **common)
    common["sample"] = dataclasses.replace(common["sample"], flow_shift=STUDENT_FLOW_SHIFT)
    scm = SCMConfig(p_mean=1.3, guidance_scales=(GUIDANCE_SCALE,), tangent_warmup_steps=min(200, student_steps // 5))
    if "tbcm" in tokens:
        # Image-free: a quarter of the prompts, each giving 4 points of an 8-point trajectory, so the student
        # trains on as many rows as SANA-Sprint's. The trajectory times are sCM's (sorted log-normal, p_mean
        # 1.3: where the teacher was trained); on TBCM's stratified route through the teacher's schedule
        # half the points lie below t = 1.1 and the 1-step student reached 55.9% / Fréchet 52.8 against
        # 59.0% / 34.7 here (160 updates, the full demo's teacher).
        return Config(
            model=STUDENT, teacher=TEACHER, recipe="tbcm",
            train=TrainConfig(steps=student_steps, learning_rate=2e-4, warmup_steps=min(50, student_steps // 10),
                              **{**train, "batch_size": batch_size // 4}),
            tbcm=TBCMConfig(scm=scm, route_points=8, route_strategy="sorted_lognormal", points_per_trajectory=4),
            **common)
    if "s2flash" in tokens:
        # 8 steps, sampled at 1, 5 and 8 by the demo: the 8-step set holds the pure-noise time (the 1-step
        # path), its 7 other times bracket the 5-step sampler's 4, and the discriminator gets 8 noise levels.
        # The set is placed by the sampler's flow_shift 6, so it spans t = 0.87–1.54, where the teacher was
        # trained (log tan t ~ N(2.0, 1.6)), as the sCM times at p_mean 1.3 are; the sCM term (weight 1)
        # takes its times from it. No unconditional stage: the demo scores prompt alignment, which a
        # caption-blind discriminator stops rewarding.
        return Config(
            model=STUDENT, teacher=TEACHER, recipe="s2flash",
            train=TrainConfig(steps=student_steps, learning_rate=2e-4, warmup_steps=min(50, student_steps // 10),
                              **train),
            s2flash=S2FlashConfig(steps=8, block_ids=(0, 1), scm=scm),
            **common)
    if "lcm" in tokens:
        # LCM-LoRA: rank-8 adapters on every attention / Mix-FFN projection of a frozen copy of the teacher,
        # consistency across one step of the teacher's own 20-step sampler (shift 3). Adapters take a
        # larger learning rate than a whole network (diffusers: 1e-4 for LoRA against 1e-6 for the UNet).
        return Config(
            model=dataclasses.replace(STUDENT, lora_rank=8, lora_alpha=8.0), teacher=TEACHER, recipe="lcm",
            train=TrainConfig(steps=student_steps, learning_rate=1e-3, warmup_steps=min(50, student_steps // 10),
                              trainable=(ADAPTER_PATTERN,), **train),
            lcm=LCMConfig(solver_steps=TEACHER_SAMPLING_STEPS, solver_shift=FLOW_SHIFT, scm=scm),
            **common)
    if "sd35" in tokens:
        # 4 steps on the sampler's step set (flow_shift 6, as every student here). One fake-score update per
        # student update, not DMD2's 5 (5 would cost three times as long again). Real score: the teacher at
        # GUIDANCE_SCALE, which the student is sampled with. Stage 1 (distribution matching) for
        # the first half of the student's updates, stage 2 adds the intermediate-state adversary (conv heads
        # on both teacher blocks, refreshed every 20 of its updates): 2·N + N/2 global steps give the student
        # N updates, as the other recipes'. Adversarial weight 0.5: at the first update its gradient on the
        # student is 0.38x the DM term's at weight 1 (untrained heads, measured on the demo's teacher).
        return Config(
            model=STUDENT, teacher=TEACHER, recipe="sd35_flash",
            train=TrainConfig(steps=2 * student_steps + student_steps // 2, learning_rate=1e-4,
                              warmup_steps=min(50, student_steps // 10), **train),
            sd35_flash=SD35FlashConfig(steps=4, guidance_scale=GUIDANCE_SCALE, fake_score_updates=1,
                                       adversarial_weight=0.5, adversarial_from=student_steps, block_ids=(0, 1),
                                       discriminator_refresh_every=20),
            **common)
    return Config(
        model=STUDENT, teacher=TEACHER,
        train=TrainConfig(steps=student_steps, learning_rate=2e-4, warmup_steps=min(50, student_steps // 10), **train),
        sana_sprint=SanaSprintConfig(
            scm=scm,
            ladd=LADDConfig(p_mean=-0.6 + math.log(FLOW_SHIFT), block_ids=(0, 1))),
        **common)
