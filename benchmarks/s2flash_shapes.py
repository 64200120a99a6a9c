"""S2-Flash against its baselines on the shapes demo: the S2-Flash student, the LCM-LoRA baseline and
the SANA-Sprint student, each sampled at 1, 5 and 8 steps (SANA-Sprint also at its own 2 and 4),
scored by prompt accuracy and by whole-image and patch-level Fréchet distance.

Runs (or resumes) the full demo with the three recipes — one teacher, three distillations of the
same number of updates — then scores every student at every step count on the demo's held-out
prompts and writes DEMO/s2flash-comparison/{metrics.json, metrics.md}.

  python benchmarks/s2flash_shapes.py [--demo runs/shapes-demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2flash_jax.demo import (  # noqa: E402
    RECIPES, TEACHER_STEPS, run_shapes_demo, score_models, student_rows, write_metrics)
from s2flash_jax.eval.frechet import load_feature_net  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402

# recipe -> (row label, step counts)
COMPARED = {"s2flash": ("S2-Flash student", (1, 5, 8)), "lcm-lora": ("LCM-LoRA student", (1, 5, 8)),
            "sana-sprint": ("SANA-Sprint student", (1, 2, 4, 5, 8))}
SAMPLES_PER_PROMPT = 4


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/shapes-demo"), help="full demo directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    demo = run_shapes_demo(args.demo, recipes=tuple(COMPARED))
    rows = {"reference renders": (None, 0),
            f"teacher, {TEACHER_STEPS} steps": (TextToImage.load(args.demo / "teacher" / "model"), TEACHER_STEPS)}
    for recipe, (label, steps) in COMPARED.items():
        rows |= student_rows(label, TextToImage.load(args.demo / RECIPES[recipe].run / "model"), steps)
    results, _, _ = score_models(rows, load_feature_net(args.demo / "feature_net"), SAMPLES_PER_PROMPT)
    metrics = {"models": results, "training": demo["training"],
               "samples_per_prompt": SAMPLES_PER_PROMPT, "wall_s": {"benchmark_s": time.perf_counter() - start}}
    out = args.demo / "s2flash-comparison"
    out.mkdir(exist_ok=True)
    write_metrics(metrics, out / "metrics")
    return metrics


if __name__ == "__main__":
    main()
