"""One SANA-Sprint training step (sCM + LADD) against a plain flow-matching step, in JAX and in a PyTorch
reference (diffusers' SanaTransformer2DModel, torch.func.jvp), on the same networks, weights and batch.

Default: the tiny SANA-Sprint configs (configs/tiny.py student and teacher), 2 layers, batch 8 (one
BatchNormLocal group), 16x16 latents, a 16-token caption, float32 on the CPU. Rows, each one
optimizer step of median wall time:
  flow_matching       rectified-flow loss of the student-shaped model, value_and_grad + the same optimizer
  scm_ladd_generator  the recipe's "generator" phase: teacher CFG call, student JVP, two student calls with
                      gradient (sCM, adversarial sample), the adversarial term through the teacher's blocks
  ladd_discriminator  the recipe's "discriminator" phase: student sample, two hooked-teacher calls, hinge
  g+d_pair            generator + discriminator, what one training cycle costs
jax/torch below 1 means JAX is faster. Goals: JVP overhead (generator / flow_matching) <= 2.5x, JAX
faster than torch. Both sides use the reference optimizer: clip at 0.1 then CAME (came-pytorch for torch).
Before timing, checks that the JAX generator losses are finite and equal the torch reference's on the
same random draws (past the tangent warm-up, so the JVP term counts); tests/test_sprint_parity.py checks
both phases, gradients and spectral norms the same way.

  python benchmarks/objective.py [--layers 2] [--batch 8] [--size 16] [--caption-length 16] [--repeats 5]
                                 [--width 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from came_pytorch import CAME  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import timed  # noqa: E402
from s2flash_jax.config import load_config  # noqa: E402
from s2flash_jax.flows.flow_matching import per_example  # noqa: E402
from s2flash_jax.losses.scm import sample_guidance_scales  # noqa: E402
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig, sana_sprint  # noqa: E402
from tests import sprint_reference as ref  # noqa: E402

LEARNING_RATE, CLIP_NORM = 2e-6, 0.1  # reference_optimizer()'s defaults, mirrored on the torch side
CHECKED = ("scm/loss", "scm/loss_no_logvar", "generator/adversarial")
CHECK_RTOL = 1e-3  # float32 both sides, different summation orders; wrong maths moves these by far more
CHECK_SEED = 1  # the key of the generator call whose losses are checked against torch


# ---- network configs ----

def model_configs(args):
    """(student, teacher) SanaConfigs: tiny, with --layers and, if given, --width via the head counts."""
    configs = []
    for spec in ("configs/tiny.py", "configs/tiny.py:teacher"):
        config = dataclasses.replace(load_config(spec).model, num_layers=args.layers)
        if args.width:
            if args.width % config.attention_head_dim or args.width % config.cross_attention_head_dim:
                raise SystemExit(f"--width {args.width} must be a multiple of the head dims "
                                 f"{config.attention_head_dim} and {config.cross_attention_head_dim}")
            config = dataclasses.replace(
                config, num_attention_heads=args.width // config.attention_head_dim,
                num_cross_attention_heads=args.width // config.cross_attention_head_dim,
                cross_attention_dim=args.width)
        configs.append(config)
    student, teacher = configs
    return dataclasses.replace(student, logvar_head=True), teacher


def ladd_blocks(layers: int) -> tuple[int, ...]:
    """Up to 4 evenly spread teacher blocks ending at the last one, so the torch teacher (which runs
    every block under its hooks) does no more work than JAX's block_features (which stops early)."""
    k = min(4, layers)
    return tuple(sorted({round(i * (layers - 1) / max(k - 1, 1)) for i in range(k)}))


# ---- JAX steps ----

def fresh_buffers(tree):
    """A copy with one buffer per leaf: split parameters alias the module's arrays, which donation
    would otherwise invalidate."""
    return jax.tree.map(jnp.copy, tree)


def jax_flow_matching(student, optimizer, config: SanaSprintConfig):
    """(jitted step(carry, batch, key) -> (carry, loss), initial carry) for the rectified-flow baseline:
    x_s = (1 - s)·x0 + s·ε, s = sigmoid(N(0, 1)), loss = mean((v - (ε - x0))²), guidance as in sCM."""
    graphdef, params = nnx.split(student)

    def loss_fn(params, batch, key):
        net = nnx.merge(graphdef, params)
        x0 = batch["latents"]
        s_key, noise_key, w_key = jax.random.split(key, 3)
        s = jax.nn.sigmoid(jax.random.normal(s_key, (x0.shape[0],)))
        noise = jax.random.normal(noise_key, x0.shape)
        x_s = (1 - per_example(s, x0)) * x0 + per_example(s, x0) * noise
        w = sample_guidance_scales(w_key, x0.shape[0], config.scm)
        v = net(x_s, s, batch["caption"], batch["caption_mask"], w * net.config.guidance_embeds_scale)
        return jnp.mean((v - (noise - x0)) ** 2)

    def step(carry, batch, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), fresh_buffers((params, optimizer.init(params)))


def jax_runner(step, carry, batch, seed: int):
    """A no-argument call of a donating `step(carry, batch, key) -> (carry, out)` that threads the
    carry and a fresh key through successive calls and blocks until each is done."""
    holder = {"carry": carry, "key": jax.random.key(seed)}

    def run():
        holder["key"], key = jax.random.split(holder["key"])
        holder["carry"], _ = step(holder["carry"], batch, key)
        jax.block_until_ready(holder["carry"])

    return run


def first_call_seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# ---- torch steps ----

def torch_optimizer(parameters):
    return CAME(parameters, lr=LEARNING_RATE, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.0)


def torch_update(loss, module, optimizer):
    """backward, clip at CLIP_NORM, optimizer step: what reference_optimizer() does in JAX."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def on_device(tensors, device):
    """A dataclass of tensors (draws, TorchBatch) with every tensor moved to `device` (None: as is)."""
    if device is None:
        return tensors
    return dataclasses.replace(tensors, **{field.name: getattr(tensors, field.name).to(device)
                                           for field in dataclasses.fields(tensors)})


def torch_steps(nets: ref.Networks, tb: ref.TorchBatch, config: SanaSprintConfig, step: int, device=None):
    """{row name: no-argument torch step}. Each phase trains only its own network: the other's
    parameters are frozen so autograd does no work for them (JAX differentiates only the trained one).
    device: where the networks and `tb` are (None: the CPU); random draws are made on the CPU and moved."""
    student, discriminator = nets.torch_student, nets.torch_discriminator
    g_opt, fm_opt = torch_optimizer(student.parameters()), torch_optimizer(student.parameters())
    d_opt = torch_optimizer(discriminator.heads.parameters())
    generator = torch.Generator().manual_seed(0)
    scm, shape = config.scm, tuple(tb.x0.shape)

    def flow_matching():
        student.requires_grad_(True)
        x0, size = tb.latents, tb.latents.shape[0]
        s = torch.sigmoid(torch.randn(size, generator=generator)).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        sb = s.view(-1, 1, 1, 1)
        scales = ref.guidance_scales(size, scm, generator).to(x0.device)
        guidance = scales * student.model.config.guidance_embeds_scale
        v = student.model(((1 - sb) * x0 + sb * noise), tb.caption, student.time_input(s), guidance=guidance,
                          encoder_attention_mask=tb.caption_mask, return_dict=False)[0]
        torch_update(((v - (noise - x0)) ** 2).mean(), student, fm_opt)

    def generator_step():
        student.requires_grad_(True)
        discriminator.heads.requires_grad_(False)
        draws = on_device(ref.sample_generator_draws(shape, scm, config.ladd, generator), device)
        loss, _ = ref.torch_generator_loss(nets, tb, draws, config, step)
        torch_update(loss, student, g_opt)

    def discriminator_step():
        student.requires_grad_(False)
        discriminator.heads.requires_grad_(True)
        draws = on_device(ref.sample_discriminator_draws(shape, scm, config.ladd, generator), device)
        loss, _ = ref.torch_discriminator_loss(nets, tb, draws, config)
        torch_update(loss, discriminator.heads, d_opt)

    return {"flow_matching": flow_matching, "scm_ladd_generator": generator_step,
            "ladd_discriminator": discriminator_step}


# ---- check and main ----

def check_generator(jax_metrics, torch_metrics):
    """Finite JAX losses that agree with torch; returns the worst relative difference."""
    bad = [k for k, v in jax_metrics.items() if not np.isfinite(float(v))]
    if bad:
        raise SystemExit(f"non-finite JAX generator metrics: {bad}")
    diffs = {k: abs(float(jax_metrics[k]) - torch_metrics[k]) / max(abs(torch_metrics[k]), 1e-12) for k in CHECKED}
    if max(diffs.values()) > CHECK_RTOL:
        listed = ", ".join(f"{k} jax {float(jax_metrics[k]):.6g} torch {torch_metrics[k]:.6g}" for k in CHECKED)
        raise SystemExit(f"JAX and torch generator losses differ beyond rtol {CHECK_RTOL}: {listed}")
    return max(diffs.values())


def jax_phase_steps(nets: ref.Networks, batch, config: SanaSprintConfig, step: int):
    """(recipe, its state at `step`, {phase: jitted donating step(state, batch, key) -> (state, metrics)})
    of the SANA-Sprint recipe on the JAX networks."""
    recipe, state = sana_sprint(nets.student, nets.teacher, nets.discriminator, jnp.asarray(batch["null_caption"]),
                                jnp.asarray(batch["null_caption_mask"]), config)
    state = fresh_buffers(state.replace(step=jnp.int32(step)))
    return recipe, state, {name: jax.jit(functools.partial(recipe.phase_update, name), donate_argnums=0)
                           for name in ("generator", "discriminator")}


def check_against_torch(jax_metrics, latent_shape, nets: ref.Networks, torch_ref: ref.TorchBatch,
                        config: SanaSprintConfig, step: int, device=None) -> float:
    """Worst relative difference between the losses of a JAX generator call keyed CHECK_SEED and the
    torch reference's on the same draws (an error beyond CHECK_RTOL). device: the torch networks'."""
    draws = on_device(ref.jax_generator_draws(jax.random.key(CHECK_SEED), latent_shape, config), device)
    _, torch_metrics = ref.torch_generator_loss(nets, torch_ref, draws, config, step)
    return check_generator(jax_metrics, {name: float(value) for name, value in torch_metrics.items()})


def jax_steps(nets: ref.Networks, batch, jax_batch, torch_ref: ref.TorchBatch, config: SanaSprintConfig, step: int):
    """({row name: no-argument JAX step}, {phase: compile seconds}, worst relative loss difference).

    The first generator call compiles and gives the losses to check against torch on the same
    draws; each runner then starts from the state it returned."""
    recipe, state, phase_steps = jax_phase_steps(nets, batch, config, step)
    g_step, d_step = phase_steps["generator"], phase_steps["discriminator"]
    fm_step, fm_carry = jax_flow_matching(nets.student, recipe.optimizers["student"], config)

    start = time.perf_counter()
    state, jax_metrics = g_step(state, jax_batch, jax.random.key(CHECK_SEED))
    jax.block_until_ready(state)
    compile_s = {"G": time.perf_counter() - start}
    max_diff = check_against_torch(jax_metrics, jax_batch["latents"].shape, nets, torch_ref, config, step)

    runs = {"flow_matching": jax_runner(fm_step, fm_carry, jax_batch, seed=2),
            "scm_ladd_generator": jax_runner(g_step, state, jax_batch, seed=3),
            # Both phases continue from the checked state; donation by one would delete the other's.
            "ladd_discriminator": jax_runner(d_step, fresh_buffers(state), jax_batch, seed=4)}
    compile_s["D"] = first_call_seconds(runs["ladd_discriminator"])
    compile_s["FM"] = first_call_seconds(runs["flow_matching"])
    return runs, compile_s, max_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--caption-length", type=int, default=16)
    parser.add_argument("--width", type=int, default=None, help="model width (default: the tiny config's 64)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    wall_start = time.perf_counter()

    # XLA's CPU client runs on every core it may use; give torch the same.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    student_config, teacher_config = model_configs(args)
    blocks = ladd_blocks(args.layers)
    config = SanaSprintConfig(ladd=dataclasses.replace(SanaSprintConfig().ladd, block_ids=blocks))
    nets = ref.build_networks(student_config, teacher_config, config)
    batch = ref.make_batch(args.batch, args.size, args.caption_length, student_config)
    jax_batch = {k: jnp.asarray(batch[k]) for k in ("latents", "caption", "caption_mask")}
    torch_ref = ref.torch_batch(batch, config.scm.sigma_data)
    # Past the tangent warm-up (r = 1), so the checked loss depends on the JVP; the step count
    # changes no work, only r.
    step = config.scm.tangent_warmup_steps

    jax_runs, compile_s, max_diff = jax_steps(nets, batch, jax_batch, torch_ref, config, step)
    torch_runs = torch_steps(nets, torch_ref, config, step)
    # Row by row, JAX then torch, so a ratio's two sides see the same background load.
    jax_ms, torch_ms = {}, {}
    for name in jax_runs:
        jax_ms[name], torch_ms[name] = timed(jax_runs[name], args.repeats), timed(torch_runs[name], args.repeats)
    for times in (jax_ms, torch_ms):
        times["g+d_pair"] = times["scm_ladd_generator"] + times["ladd_discriminator"]

    compiled = " ".join(f"{phase} {seconds:.1f}s" for phase, seconds in compile_s.items())
    print(f"# tiny: width {student_config.inner_dim}, {args.layers} layers, batch {args.batch}, "
          f"{args.size}x{args.size} latents, caption {args.caption_length}, LADD blocks {list(blocks)}, float32, "
          f"{jax.devices()[0].platform} / torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"jax compile {compiled}; G loss vs torch: max rel. diff {max_diff:.1e}")
    print(f"{'step':<20}{'jax_ms':>10}{'torch_ms':>10}{'jax/torch':>11}")
    for name in jax_ms:
        print(f"{name:<20}{jax_ms[name]:>10.1f}{torch_ms[name]:>10.1f}{jax_ms[name] / torch_ms[name]:>11.2f}")
    overhead = {side: times["scm_ladd_generator"] / times["flow_matching"]
                for side, times in (("jax", jax_ms), ("torch", torch_ms))}
    print(f"jvp_overhead (generator / flow_matching): jax {overhead['jax']:.1f}x, torch {overhead['torch']:.1f}x "
          f"(goal <= 2.5x)")
    print(f"# total {time.perf_counter() - wall_start:.0f}s")


if __name__ == "__main__":
    main()
