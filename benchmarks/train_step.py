"""The SANA-Sprint training step (sCM + LADD: generator then discriminator update) in JAX against
the PyTorch reference (diffusers' SanaTransformer2DModel, torch.func.jvp, came-pytorch): same
networks, weights, hyperparameters and batch, float32 on both sides. Reports examples/s (an update
takes one global batch; generator and discriminator updates alternate, as in `s2flash train`),
peak memory (see benchmarks/memory.py), the JAX step's FLOPs (s2flash_jax/train/flops.py) and its model
FLOPs utilisation on accelerators with a known peak.

The pieces are benchmarks/objective.py's (which also times a flow-matching baseline) and the
reference is tests/sprint_reference.py's; before timing, the JAX generator losses are checked
against the reference's on the same random draws.

  python -m benchmarks.train_step [--shapes auto|cpu|smoke|accelerator] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import torch

from benchmarks import objective
from benchmarks.entry import benchmark_main
from s2flash_jax.train.flops import matmul_flops, model_flops_utilisation, peak_flops
from benchmarks.memory import TorchPeak, jax_peak_bytes, tensor_bytes
from benchmarks.shapes import Shapes, model_pair
from benchmarks.timing import timed
from benchmarks.torch_side import synchronised, torch_device
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig
from tests import sprint_reference as ref

PHASES = ("generator", "discriminator")
TORCH_ROWS = {"generator": "scm_ladd_generator", "discriminator": "ladd_discriminator"}


def run(shapes: Shapes, repeats: int) -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # XLA's CPU client uses every core it may
    student_config, teacher_config = model_pair(shapes)
    config = SanaSprintConfig(ladd=dataclasses.replace(SanaSprintConfig().ladd,
                                                       block_ids=objective.ladd_blocks(teacher_config.num_layers)))
    nets = ref.build_networks(student_config, teacher_config, config)
    batch = ref.make_batch(shapes.train_batch, shapes.latent_size, shapes.caption_length, student_config)
    step = config.scm.tangent_warmup_steps  # past the warm-up, so the JVP term counts (work is the same)
    device = torch_device()

    jax_runs, jax_result, metrics = jax_side(nets, batch, config, step)
    result = {"shapes": dataclasses.asdict(shapes), "describe": shapes.describe(), "batch": shapes.train_batch,
              "dtype": "float32"}
    if device is not None:
        torch_runs, torch_result, result["generator_loss_max_rel_diff"] = torch_side(nets, batch, config, step,
                                                                                      device, metrics)
    jax_ms, torch_ms = {}, {}
    for p in PHASES:  # phase by phase, JAX then torch, so a ratio's two sides see the same background load
        jax_ms[p] = timed(jax_runs[p], repeats)
        if device is not None:
            torch_ms[p] = timed(torch_runs[p], repeats)

    cycle_s = sum(jax_ms.values()) / 1e3
    flops = sum(jax_result["flops_per_update"].values())
    result["jax"] = {**jax_result, "update_ms": jax_ms, "examples_per_s": len(PHASES) * shapes.train_batch / cycle_s,
                     "tflops_per_s": flops / cycle_s / 1e12,
                     "mfu": model_flops_utilisation(flops, cycle_s, jax.devices()[0]),
                     "peak_flops": peak_flops(jax.devices()[0])}
    if device is None:
        return {**result, "torch": None, "ratio": None}
    result["torch"] = {**torch_result, "update_ms": torch_ms,
                       "examples_per_s": len(PHASES) * shapes.train_batch / (sum(torch_ms.values()) / 1e3)}
    result["ratio"] = {
        "examples_per_s_jax_over_torch": result["jax"]["examples_per_s"] / result["torch"]["examples_per_s"],
        "peak_bytes_jax_over_torch": result["jax"]["peak_bytes"] / result["torch"]["peak_bytes"]}
    return result


def jax_side(nets: ref.Networks, batch: dict, config: SanaSprintConfig, step: int):
    """({phase: no-argument timed update}, {flops_per_update, peak_bytes, peak_measured_as}, the
    metrics of a first generator update keyed objective.CHECK_SEED, for the check against torch)."""
    jax_batch = {k: jnp.asarray(batch[k]) for k in ("latents", "caption", "caption_mask")}
    recipe, state, phase_steps = objective.jax_phase_steps(nets, batch, config, step)
    key = jax.random.key(0)
    compiled = {p: phase_steps[p].lower(state, jax_batch, key).compile() for p in PHASES}
    flops = {p: matmul_flops(functools.partial(recipe.phase_update, p), state, jax_batch, key) for p in PHASES}
    state, metrics = compiled["generator"](state, jax_batch, jax.random.key(objective.CHECK_SEED))
    runs = {"generator": objective.jax_runner(compiled["generator"], state, jax_batch, seed=3),
            # Both phases continue from the checked state; donation by one would delete the other's.
            "discriminator": objective.jax_runner(compiled["discriminator"], objective.fresh_buffers(state),
                                                  jax_batch, seed=4)}
    peak, how = jax_peak_bytes(compiled.values())
    return runs, {"flops_per_update": flops, "peak_bytes": peak, "peak_measured_as": how}, metrics


def torch_side(nets: ref.Networks, batch: dict, config: SanaSprintConfig, step: int, device: str, jax_metrics):
    """({phase: no-argument timed update}, {device, peak_bytes, peak_measured_as}, the worst relative
    difference of the generator losses from JAX's). One warm-up cycle runs here, its memory measured."""
    for network in (nets.torch_student, nets.torch_teacher, nets.torch_discriminator):
        network.to(device)
    torch_ref = objective.on_device(ref.torch_batch(batch, config.scm.sigma_data), device)
    difference = objective.check_against_torch(jax_metrics, batch["latents"].shape, nets, torch_ref, config, step,
                                               device)
    steps = objective.torch_steps(nets, torch_ref, config, step, device)
    runs = {p: synchronised(steps[TORCH_ROWS[p]], device) for p in PHASES}
    live = tensor_bytes([nets.torch_student, nets.torch_teacher, nets.torch_discriminator],
                        [torch_ref.x0, torch_ref.latents, torch_ref.caption, torch_ref.caption_mask])
    with TorchPeak(device, live) as peak:  # the optimizer state is created in this first cycle
        for p in PHASES:
            runs[p]()
    return runs, {"device": device, "peak_bytes": peak.bytes, "peak_measured_as": peak.how}, difference


if __name__ == "__main__":
    benchmark_main(run, __doc__.splitlines()[0])
