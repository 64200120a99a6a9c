"""Distillation health: numbers that show a failing student long before its loss curve does.

Every `health.every` steps (and once before the first update, as the baseline) the run's student
samples a fixed held-out set (the first captions of the data, fixed noise) in 1, 2 and 4 steps and
is compared with the frozen teacher's guided ODE solution from the same noise — where a
consistency model's samples should land:

  health/latent_mse/<n>step   mean squared latent error to the teacher's solution
  health/psnr/<n>step         20·log10(range of the solution) − 10·log10(MSE), in dB
  health/hf_ratio/<n>step     the samples' share of spectral energy above half the Nyquist radius,
                              over the solution's share (rises as samples turn noisy)
  health/param_change         ‖θ − θ_init‖ / ‖θ_init‖ of the trained product network

with the sCM tangent norm and logvar of the latest update. A check that goes the wrong way prints a
warning (see `warnings_for`); every check is appended to RUN_DIR/health.json, whose first entry is
the baseline a resumed run keeps comparing against.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from s2flash_jax.data.pipeline import first_batch
from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.models.backbone import abstract_backbone
from s2flash_jax.sampling import few_step_sample

STUDENT_STEPS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """every: global steps between checks (0: off); prompts: held-out captions and noises checked;
    teacher_steps, teacher_flow_shift: the guided Euler steps of the teacher's ODE solution and the
    shift of their schedule (guidance from `sample`; the student samples as `sample` says).
    Warnings: max_mse_rise — the 1-step latent MSE to the solution grew past this many times its
    baseline; max_hf_ratio — samples carry this many times the solution's high-frequency share;
    max_tangent_rise — the sCM tangent norm grew past this many times its baseline;
    min_param_change — ‖θ − θ_init‖ / ‖θ_init‖ after the first update is below this (a healthy
    run at SANA-Sprint's learning rate 2e-6 moves ~1e-5 in its first update)."""

    every: int = 0
    prompts: int = 8
    teacher_steps: int = 20
    teacher_flow_shift: float = 1.0
    max_mse_rise: float = 1.5
    max_hf_ratio: float = 2.0
    max_tangent_rise: float = 10.0
    min_param_change: float = 1e-8

    def __post_init__(self):
        if self.every < 0 or self.prompts < 1 or self.teacher_steps < 1:
            raise ValueError(f"health: every ({self.every}) must be >= 0, prompts ({self.prompts}) and "
                             f"teacher_steps ({self.teacher_steps}) >= 1")
        if min(self.max_mse_rise, self.max_hf_ratio, self.max_tangent_rise) <= 1.0:
            raise ValueError("health: max_mse_rise, max_hf_ratio and max_tangent_rise must be > 1")
        if self.min_param_change < 0 or self.teacher_flow_shift <= 0:
            raise ValueError(f"health: min_param_change ({self.min_param_change}) must be >= 0 and "
                             f"teacher_flow_shift ({self.teacher_flow_shift}) > 0")


def held_out_batch(config, mesh, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(caption [count, L, D], caption_mask [count, L], unit noise [count, H, W, C]), replicated on
    the mesh: the first captions of the data and noise from config.sample.seed."""
    m = config.model
    first = first_batch(config.data, count, seed=config.seed, latent_shape=None,
                        caption_length=config.data.caption_length, caption_dim=m.caption_channels)
    noise = standard_normal(jax.random.key(config.sample.seed), (count, m.sample_size, m.sample_size, m.in_channels))
    replicated = NamedSharding(mesh, PartitionSpec())
    return tuple(jax.device_put(np.asarray(x), replicated) for x in (first["caption"], first["caption_mask"], noise))


def high_frequency_share(latents: jax.Array) -> jax.Array:
    """Share of each image's (mean-removed) spectral energy above half the Nyquist radius, averaged
    over the batch. latents: [B, H, W, C]."""
    x = latents - jnp.mean(latents, axis=(1, 2), keepdims=True)
    power = jnp.abs(jnp.fft.fft2(x, axes=(1, 2))) ** 2
    fy, fx = jnp.meshgrid(jnp.fft.fftfreq(x.shape[1]), jnp.fft.fftfreq(x.shape[2]), indexing="ij")
    high = (jnp.sqrt(fy**2 + fx**2) > 0.25)[None, :, :, None]
    return jnp.mean(jnp.sum(power * high, axis=(1, 2, 3)) / (jnp.sum(power, axis=(1, 2, 3)) + 1e-12))


def sample_metrics(student: dict[int, jax.Array], solution: jax.Array) -> dict[str, jax.Array]:
    """The health/ sample metrics of student samples {steps: [B, ...]} against the teacher's solution."""
    metrics = {}
    peak = jnp.max(solution) - jnp.min(solution)
    solution_hf = high_frequency_share(solution)
    for n, samples in student.items():
        mse = jnp.mean((samples - solution) ** 2)
        metrics[f"health/latent_mse/{n}step"] = mse
        metrics[f"health/psnr/{n}step"] = 20 * jnp.log10(peak) - 10 * jnp.log10(mse)
        metrics[f"health/hf_ratio/{n}step"] = high_frequency_share(samples) / solution_hf
    return metrics


def baseline_of(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's first recorded value (the tangent norm first appears after the first update)."""
    baseline: dict[str, float] = {}
    for check in history:
        for key, value in check.items():
            baseline.setdefault(key, value)
    return baseline


def warnings_for(check: dict[str, float], baseline: dict[str, float], config: HealthConfig) -> list[str]:
    """The problems one check shows, each as one sentence; baseline: see baseline_of."""
    step = int(check["step"])
    problems = [f"{k} is {v} at step {step}" for k, v in check.items() if not math.isfinite(v)]
    change = check.get("health/param_change", math.inf)
    if step > int(baseline["step"]) and change <= config.min_param_change:
        problems.append(f"the trained network has hardly changed since initialisation after {step} updates "
                        f"(relative change {change:.3g}): learning rate too small to move its weights, zero "
                        "gradients, or a frozen subset (train.trainable) that misses what should train?")
    key = "health/latent_mse/1step"
    if key in baseline and check.get(key, 0.0) > config.max_mse_rise * baseline[key]:
        problems.append(f"1-step samples are moving away from the teacher's ODE solution: latent MSE "
                        f"{check[key]:.4g} at step {step} against {baseline[key]:.4g} at step {int(baseline['step'])}")
    for n in STUDENT_STEPS:
        ratio = check.get(f"health/hf_ratio/{n}step", 0.0)
        if ratio > config.max_hf_ratio:
            problems.append(f"{n}-step samples carry {ratio:.3g}x the teacher's high-frequency energy share at "
                            f"step {step}: they are turning noisy")
    key = "scm/tangent_norm"
    if baseline.get(key) and check.get(key, 0.0) > config.max_tangent_rise * baseline[key]:
        problems.append(f"the sCM tangent norm grew from {baseline[key]:.4g} to {check[key]:.4g} at step {step}")
    return problems


class HealthMonitor:
    """Runs the checks of one training invocation. product: the trained network checked;
    initial_params: its parameters at initialisation (replicated or sharded, not modified)."""

    def __init__(self, config, mesh, product: str, initial_params: Any, path: Path):
        self.config, self.product, self.path = config.health, product, path
        self.initial_params = jax.tree.map(jnp.copy, initial_params)  # the train step donates its input
        self.caption, self.mask, self.noise = held_out_batch(config, mesh, config.health.prompts)
        self.history: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
        self.latest: dict[str, jax.Array] = {}
        sample, has_teacher = config.sample, config.teacher is not None
        abstract = lambda c: nnx.graphdef(abstract_backbone(c, config.precision))  # noqa: E731
        student_graph = abstract(config.model)
        teacher_graph = abstract(config.teacher) if has_teacher else None
        replicated = NamedSharding(mesh, PartitionSpec())

        def measure(params, initial, frozen, caption, mask, noise):
            model = nnx.merge(student_graph, params)
            null = frozen["null_caption"]
            students = {n: few_step_sample(model, noise, caption, mask, jax.random.key(0), steps=n,
                                           guidance_scale=sample.guidance_scale, flow_shift=sample.flow_shift,
                                           null_caption=null)
                        for n in STUDENT_STEPS}
            metrics = {"health/param_change": optax.tree.norm(jax.tree.map(jnp.subtract, params, initial))
                       / optax.tree.norm(initial)}
            if has_teacher and "teacher" in frozen:
                teacher = nnx.merge(teacher_graph, jax.tree.map(lambda x: x.astype(jnp.float32), frozen["teacher"]))
                solution = few_step_sample(teacher, noise, caption, mask, jax.random.key(0),
                                           steps=self.config.teacher_steps, guidance_scale=sample.guidance_scale,
                                           flow_shift=self.config.teacher_flow_shift, null_caption=null)
                metrics |= sample_metrics(students, solution)
            return metrics

        self.measure = jax.jit(measure, out_shardings=replicated)

    def observe(self, metrics: dict[str, jax.Array]) -> None:
        """Keep the latest update's sCM tangent norm and logvar (device values, not fetched)."""
        self.latest |= {k: metrics[k] for k in ("scm/tangent_norm", "scm/logvar") if k in metrics}

    def check(self, state, step: int, writer=None, primary: bool = True) -> list[str]:
        """Measure at `step`, append to health.json, print and return the warnings."""
        measured = self.measure(state.distill.params[self.product], self.initial_params, state.distill.frozen,
                                self.caption, self.mask, self.noise)
        check = {"step": step, **{k: float(v) for k, v in jax.device_get({**measured, **self.latest}).items()}}
        if any(int(c["step"]) == step for c in self.history):  # a resumed run repeating a check
            return []
        problems = warnings_for(check, baseline_of([*self.history, check]), self.config)
        self.history.append({**check, "warnings": problems})
        if primary:
            staging = self.path.with_suffix(".json.tmp")
            staging.write_text(json.dumps(self.history, indent=1) + "\n")
            staging.replace(self.path)
            if writer is not None:
                for key, value in check.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
            for problem in problems:
                print(f"health warning: {problem}", file=sys.stderr, flush=True)
        return problems
