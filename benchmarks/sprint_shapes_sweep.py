"""SANA-Sprint on the shapes demo: how the teacher and its student move with the guidance scale, the
LADD settings and the seed.

Issue 7's goal is a 1-step student at >= 90% of the teacher's prompt accuracy. This scores the full
demo's teacher (20 steps) at each of TEACHER_GUIDANCE, trains the demo's student (configs/shapes.py,
160 updates) on it with each setting of RUNS, and scores every student at 1, 2 and 4 steps on the
held-out prompts (SAMPLES_PER_PROMPT seeds each), so a change of default is judged against the
spread between seeds, not one run. Guidance trades prompt accuracy against Fréchet distance: too
little and shapes come out wrong, too much and the teacher's samples carry a grain (amplified
cond − uncond differences) that its student inherits.

Runs (or resumes) the full demo, then trains in DEMO/sweep/NAME (each run skipped when its model
exists) and writes DEMO/sweep/metrics.{json,md} and, with --docs,
docs/images/sprint-shapes-sweep.{json,md}.

  python benchmarks/sprint_shapes_sweep.py [--demo runs/shapes-demo] [--docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2flash_jax.config import load_config  # noqa: E402
from s2flash_jax.demo import (  # noqa: E402
    TEACHER_STEPS, component_writer, run_shapes_demo, score_models, student_rows, write_metrics)
from s2flash_jax.eval.frechet import load_feature_net  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402
from s2flash_jax.train.loop import train_and_export  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_PROMPT = 4
TEACHER_GUIDANCE = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
# run -> overrides of configs/shapes.py; the demo's own student is the seed-0 default (guidance 2)
RUNS = {
    **{f"guidance{w:g}": [f"sana_sprint.scm.guidance_scales={w:g}", f"sample.guidance_scale={w:g}"]
       for w in (1.5, 2.5, 3.0)},
    "base_seed1": ["seed=1"],
    "adv1": ["sana_sprint.ladd.adversarial_weight=1.0"],
    "adv1_seed1": ["sana_sprint.ladd.adversarial_weight=1.0", "seed=1"],
    "adv2": ["sana_sprint.ladd.adversarial_weight=2.0"],
    "maxtime08": ["sana_sprint.ladd.max_time_prob=0.8"],
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/shapes-demo"), help="full demo directory")
    parser.add_argument("--docs", action="store_true", help="also write docs/images/sprint-shapes-sweep.*")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_shapes_demo(args.demo, recipes=("sana-sprint",))  # teacher, default student, data, feature net
    teacher = TextToImage.load(args.demo / "teacher" / "model")
    rows = {f"teacher, {TEACHER_STEPS} steps, guidance {w:g}": (dataclasses.replace(teacher, guidance_scale=w),
                                                                TEACHER_STEPS) for w in TEACHER_GUIDANCE}
    rows |= student_rows("default (guidance 2, adversarial weight 0.5, max-time prob. 0.5), seed 0",
                         TextToImage.load(args.demo / "student" / "model"))
    for name, overrides in RUNS.items():
        config = load_config(f"{REPO}/configs/shapes.py", [f"data.path={args.demo / 'data'}",
                                                          f"train.teacher_checkpoint={args.demo / 'teacher' / 'model'}",
                                                          *overrides])
        ckpt = train_and_export(name, config, args.demo / "sweep" / name,
                                **component_writer(args.demo / "text_encoder", teacher.autoencoder, config))
        rows |= student_rows(" ".join(overrides), TextToImage.load(ckpt))
    results, _, _ = score_models(rows, load_feature_net(args.demo / "feature_net"), SAMPLES_PER_PROMPT)
    metrics = {"models": results, "samples_per_prompt": SAMPLES_PER_PROMPT,
               "wall_s": {"benchmark_s": time.perf_counter() - start}}
    outputs = [args.demo / "sweep" / "metrics"] + ([REPO / "docs" / "images" / "sprint-shapes-sweep"]
                                                   if args.docs else [])
    write_metrics(metrics, *outputs)
    return metrics


if __name__ == "__main__":
    main()
