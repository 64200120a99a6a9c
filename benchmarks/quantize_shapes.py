"""Weight quantization of the shapes demo's student: which layers are sensitive, and what int8 / int4
weights cost in prompt accuracy and Fréchet distance for the memory they save.

Takes a finished demo's SANA-Sprint student (`s2flash demo`), then:
  1. sensitivity sweeps at int8 and int4: each layer group quantized alone (the backbone kind's sensitivity_groups),
     the relative MSE of its 1-step latents against the float student on the held-out prompts
  2. quantized checkpoints (`s2flash quantize`) in WORK/: int8 and int4 keeping quantize.default_keep,
     int4 keeping nothing, and int4 keeping those plus the --k groups the int4 sweep ranks first
  3. scores, at 1, 2 and 4 steps on the demo's held-out prompts (one sample each): the fp32 student,
     its weights rounded to bf16, and the four quantized checkpoints, sampled from disk as any
     checkpoint is (TextToImage.load: qwix's quantized matmuls)
Writes docs/images/quantize-shapes-metrics.{json,md} (--out) and prints the tables.

  python benchmarks/quantize_shapes.py [--ckpt /work/runs/shapes-demo/student/model] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from s2flash_jax.data import shapes  # noqa: E402
from s2flash_jax.demo import STUDENT_STEPS, metrics_table, score_models, student_rows  # noqa: E402
from s2flash_jax.eval.frechet import load_feature_net  # noqa: E402
from s2flash_jax.model_checkpoint import stored_params  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402
from s2flash_jax.precision import Precision  # noqa: E402
from s2flash_jax.quantize import (  # noqa: E402
    default_keep, layer_sensitivity, load_float_model, load_quantized, most_sensitive, param_bytes,
    quantize_checkpoint, relative_mse, sample)

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_PROMPT = 1  # 64 images a row: quick; the Fréchet distances are noisier than the demo's


def bf16_weights(model: nnx.Module) -> nnx.Module:
    """`model` with every parameter rounded to bfloat16 (and computed in float32, as a bf16-param,
    fp32-compute TextToImage computes)."""
    rounded = nnx.clone(model)
    nnx.update(rounded, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), nnx.state(rounded, nnx.Param)))
    return rounded


def variants(keep: tuple[str, ...], k: int, sensitivity_int4: dict[str, float]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """name -> (bits, keep) of the quantized checkpoints compared; keep: the default kept layers."""
    selective = tuple(dict.fromkeys((*keep, *most_sensitive(sensitivity_int4, k))))
    return {"int8": (8, keep), "int4-all": (4, ()), "int4": (4, keep),
            "int4-selective": (4, selective)}


def summary_table(metrics: dict) -> str:
    """One row per weight format: memory, 1-step latent error, prompt accuracy and Fréchet distance by steps."""
    steps = metrics["steps"]
    lines = ["| weights | kept in full precision | parameter bytes | vs fp32 | 1-step latent rel. MSE | "
             + " | ".join(f"prompt acc. {n} step" for n in steps) + " | "
             + " | ".join(f"Fréchet {n} step" for n in steps) + " |",
             "|---" * (5 + 2 * len(steps)) + "|"]
    full = metrics["variants"]["fp32"]["param_bytes"]
    for name, v in metrics["variants"].items():
        rows = [metrics["models"][f"{name}, {n} step{'s' if n > 1 else ''}"] for n in steps]
        lines.append(f"| {name} | {', '.join(v['keep']) or '—'} | {v['param_bytes']:,} | "
                     f"{v['param_bytes'] / full:.0%} | {v['latent_relative_mse']:.2e} | "
                     + " | ".join(f"{r['accuracy/prompt']:.1%}" for r in rows) + " | "
                     + " | ".join(f"{r['frechet']:.2f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def sensitivity_table(sensitivity: dict[str, dict[str, float]]) -> str:
    groups = list(sensitivity["int4"])
    lines = ["| layer group (quantized alone) | int8 rel. MSE | int4 rel. MSE |", "|---|---|---|"]
    lines += [f"| {g} | {sensitivity['int8'][g]:.2e} | {sensitivity['int4'][g]:.2e} |" for g in groups]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/work/runs/shapes-demo/student/model"),
                        help="the demo student's model checkpoint (DEMO/student/model)")
    parser.add_argument("--feature-net", type=Path, default=None, help="default: DEMO/feature_net")
    parser.add_argument("--work", type=Path, default=None, help="quantized checkpoints (default: DEMO/quantized)")
    parser.add_argument("--k", type=int, default=3, help="most sensitive int4 groups kept by int4-selective")
    parser.add_argument("--out", type=Path, default=REPO / "docs/images/quantize-shapes-metrics.json")
    args = parser.parse_args(argv)
    demo = args.ckpt.resolve().parents[1]
    work = args.work or demo / "quantized"
    start = time.perf_counter()

    prompts = [shapes.prompt(s) for s in shapes.heldout_scenes()]
    fp32 = TextToImage.load(args.ckpt)
    inputs = fp32.sweep_inputs(prompts, steps=1)
    model = load_float_model(args.ckpt)
    sensitivity = {f"int{bits}": layer_sensitivity(model, inputs, bits) for bits in (8, 4)}
    sweep_s = time.perf_counter() - start

    reference = sample(model, inputs)
    pipelines = {"fp32": fp32, "bf16": TextToImage.load(args.ckpt, Precision("bfloat16", "float32"))}
    report = {"fp32": {"bits": 32, "keep": [], "param_bytes": param_bytes(stored_params(args.ckpt)),
                       "latent_relative_mse": 0.0},
              "bf16": {"bits": 16, "keep": [], "param_bytes": param_bytes(pipelines["bf16"].params),
                       "latent_relative_mse": relative_mse(sample(bf16_weights(model), inputs), reference)}}
    for name, (bits, keep) in variants(default_keep(fp32.model), args.k, sensitivity["int4"]).items():
        path = work / name
        quantize_checkpoint(args.ckpt, path, bits=bits, keep=keep, force=True)
        pipelines[name] = TextToImage.load(path)
        report[name] = {"bits": bits, "keep": list(keep), "param_bytes": param_bytes(stored_params(path)),
                        "latent_relative_mse": relative_mse(sample(load_quantized(path), inputs), reference),
                        "checkpoint": str(path)}

    rows = {"reference renders": (None, 0)}
    for name, pipeline in pipelines.items():
        rows |= student_rows(name, pipeline, STUDENT_STEPS)
    results, _, _ = score_models(rows, load_feature_net(args.feature_net or demo / "feature_net"), SAMPLES_PER_PROMPT)
    metrics = {"checkpoint": str(args.ckpt), "samples_per_prompt": SAMPLES_PER_PROMPT, "heldout_prompts": len(prompts),
               "steps": list(STUDENT_STEPS), "k": args.k, "sensitivity": sensitivity, "variants": report,
               "models": results,
               "wall_s": {"sweep_s": sweep_s, "quantize_and_score_s": time.perf_counter() - start - sweep_s}}
    markdown = "\n".join([summary_table(metrics), sensitivity_table(sensitivity), metrics_table(metrics)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return metrics


if __name__ == "__main__":
    main()
