"""LCM / LCM-LoRA: latent consistency distillation (losses/lcm.py), the baseline S2-Flash compares with.

Trains: `student` (a SANA-Sprint-style student, TrigFlow-wrapped, started as a copy of the teacher).
With `model.lora_rank` > 0 and `train.trainable = ("*/lora_[ab]",)` only its adapters train and the
copied base stays frozen: LCM-LoRA, whose guidance embedder then keeps its zero output, so the
student ignores the guidance scale as LCM-LoRA's does; trained in full, it learns the scale as LCM's
w-embedding does. Frozen: `teacher` and the null caption. One phase, "generator".
Batch: as SANA-Sprint's, {"latents": [B, H, W, C] unit scale, "caption": [B, L, D], "caption_mask": [B, L]}.

The student is sampled as every consistency model here (flows/trigflow.scm_sample): x0, re-noise,
repeat, on its own step set, which need not lie on the solver grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from s2flash_jax.flows.flow_matching import classifier_free_guidance
from s2flash_jax.flows.trigflow import consistency_fn, ddim_step, noised
from s2flash_jax.losses.lcm import LCMConfig, lcm_loss, solver_grid, solver_intervals
from s2flash_jax.losses.scm import sample_guidance_scales
from s2flash_jax.models.backbone import Backbone
from s2flash_jax.recipes.base import DistillState, Phase, Recipe
from s2flash_jax.recipes.common import (
    TrigFlowNetworks, check_student_and_teacher, reference_optimizer, student_only_builder)
from s2flash_jax.recipes.registry import DemoEntry, RecipeEntry


def lcm(student: Backbone, teacher: Backbone, null_caption: jax.Array,
        config: LCMConfig = LCMConfig(), optimizer: optax.GradientTransformation | None = None
        ) -> tuple[Recipe, DistillState]:
    """The LCM recipe over these networks, and its initial state (null_caption: [L, caption_channels],
    paired with each prompt's own mask; optimizer defaults to SANA-Sprint's CAME)."""
    problems = check_student_and_teacher(student, teacher, config.scm, null_caption)
    if problems:
        raise ValueError("LCM networks do not fit together: " + "; ".join(problems))
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    nets = TrigFlowNetworks(s_graph, t_graph)
    grid = solver_grid(config.solver_steps, config.solver_shift)
    sd = config.scm.sigma_data

    def generator_loss(params, state: DistillState, batch, key):
        x0 = batch["latents"].astype(jnp.float32) * sd
        w_key, n_key, z_key = jax.random.split(key, 3)
        w = sample_guidance_scales(w_key, x0.shape[0], config.scm)
        t, t_next = solver_intervals(n_key, x0.shape[0], grid)
        x_t = noised(z_key, x0, t, sd)
        uncond, cond = nets.teacher_fn(state, batch)(x_t / sd, t)
        x_next = ddim_step(x_t, t, t_next, sd * classifier_free_guidance(uncond, cond, w))
        student = nets.student_fn(batch)

        def consistency(p, x, s):
            return consistency_fn(lambda x_hat, s_: student(p, x_hat, s_, w)[0], x, s, sd)

        loss, metrics = lcm_loss(consistency, params, x_t, t, x_next, t_next, config.huber_c)
        return loss, (metrics, {})

    recipe = Recipe(name="lcm", trains=("student",), frozen=("teacher", "null_caption"),
                    phases={"generator": Phase("generator", "student", generator_loss)}, cycle=("generator",),
                    optimizers={"student": optimizer or reference_optimizer()}, product="student")
    state = recipe.init_state(params={"student": s_params},
                              frozen={"teacher": t_params, "null_caption": jnp.asarray(null_caption),
                                      "null_caption_mask": None})
    return recipe, state


ENTRY = RecipeEntry("lcm", LCMConfig, student_only_builder(lcm), teacher="frozen",
                    summary="LCM(-LoRA): latent consistency distillation, the baseline",
                    demo=DemoEntry("lcm-lora", "lcm", "student-lcm-lora", "LCM-LoRA student", (1, 5, 8)))
