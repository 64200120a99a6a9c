"""SD3.5-Flash on the shapes demo: 4- and 8-step students with and without timestep sharing, without
the adversary, and split-timestep branches before and after merging.

Runs (or resumes) the full demo's teacher, then trains in DEMO/sd35-comparison/ (each run skipped
when its model exists):
  shared-4, random-4, shared-8, random-8   configs/shapes.py:sd35 (two stages: distribution matching,
                                           then the intermediate-state adversary) at 4 / 8 steps,
                                           DM at the student's trajectory times or at random times
  dm-only-4                                stage 1 alone (no adversary), as many student updates
  branch-early / branch-late               `train --fork shared-4`: BRANCH_STEPS more global steps on
                                           steps {0, 1} / {2, 3} of the 4-step schedule
  continued-4                              the same fork on all four steps: what the branches' extra
                                           updates give without splitting
  merged                                   `s2flash merge` of the two branches, equal weights
then scores every student at its step count on the demo's held-out prompts (SAMPLES_PER_PROMPT
seeds each) and writes DEMO/sd35-comparison/{metrics.json, metrics.md} and, with --docs,
docs/images/sd35-flash-shapes-metrics.{json,md}.

  python benchmarks/sd35_flash_shapes.py [--demo runs/shapes-demo] [--docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2flash_jax.config import load_config  # noqa: E402
from s2flash_jax.demo import (  # noqa: E402
    TEACHER_STEPS, component_writer, run_shapes_demo, score_models, write_metrics)
from s2flash_jax.eval.frechet import load_feature_net  # noqa: E402
from s2flash_jax.merge import merge_checkpoints  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402
from s2flash_jax.train.loop import STEP_MEMORY, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_PROMPT = 4
BRANCH_STEPS = 120  # global steps per branch: 40 student updates in stage 2's (generator, fake score, discriminator)
NO_ADVERSARY = ["sd35_flash.adversarial_weight=0"]
# run -> (row label, student steps, overrides of configs/shapes.py:sd35)
RUNS = {
    "shared-4": ("4 steps, timestep sharing", 4, []),
    "random-4": ("4 steps, random DM times", 4, ["sd35_flash.time_mode=random"]),
    "shared-8": ("8 steps, timestep sharing", 8, ["sd35_flash.steps=8"]),
    "random-8": ("8 steps, random DM times", 8, ["sd35_flash.steps=8", "sd35_flash.time_mode=random"]),
    "dm-only-4": ("4 steps, timestep sharing, no adversary", 4, NO_ADVERSARY),
}
# fork of shared-4 -> (row label, step_range)
BRANCHES = {"branch-early": ("branch on steps 1-2 of 4", (0, 2)), "branch-late": ("branch on steps 3-4 of 4", (2, 4)),
            "continued-4": ("shared-4 continued on all 4 steps", None)}


def _config(demo: Path, overrides: list[str]):
    return load_config(f"{REPO}/configs/shapes.py:sd35", [f"data.path={demo / 'data'}",
                                                          f"train.teacher_checkpoint={demo / 'teacher' / 'model'}",
                                                          *overrides])


def _train(name: str, config, run_dir: Path, writer: dict, fork_from: Path | None = None) -> tuple[Path, dict]:
    """Train (or resume) and export run_dir/model, unless it exists; returns it and the run's global
    steps, batch and STEP_MEMORY record (train time, peak step memory)."""
    ckpt = run_dir / "model"
    if not (ckpt / "model.json").is_file():
        print(f"{name}: {config.train.steps} global steps in {run_dir}", flush=True)
        start = time.perf_counter()
        continuing = (run_dir / "config.json").is_file()
        result = train(config, run_dir, resume=continuing, fork_from=None if continuing else fork_from)
        (run_dir / STEP_MEMORY).write_text(json.dumps({"step_peak_mb": result.step_peak_bytes / 2**20,
                                                       "train_s": time.perf_counter() - start}) + "\n")
        result.export(config, ckpt, force=True, **writer)
    return ckpt, {"steps": config.train.steps, "batch_size": config.train.batch_size,
                  **json.loads((run_dir / STEP_MEMORY).read_text())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/shapes-demo"), help="full demo directory")
    parser.add_argument("--docs", action="store_true", help="also write docs/images/sd35-flash-shapes-metrics.*")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_shapes_demo(args.demo, recipes=("sana-sprint",))  # the teacher, data and feature net (resumed)
    work = args.demo / "sd35-comparison"
    base = _config(args.demo, [])
    teacher = TextToImage.load(args.demo / "teacher" / "model")
    writer = component_writer(args.demo / "text_encoder", teacher.autoencoder, base)

    models, training = {}, {}
    for name, (label, steps, overrides) in RUNS.items():
        config = _config(args.demo, overrides)
        if name == "dm-only-4":  # stage 1's cycle only: 2 global steps per student update
            config = _config(args.demo, [*overrides, f"train.steps={2 * _student_updates(base)}"])
        models[name], training[name] = _train(name, config, work / name, writer)
        models[name] = (label, steps, models[name])
    parent = work / "shared-4"
    for name, (label, step_range) in BRANCHES.items():
        overrides = [f"train.steps={base.train.steps + BRANCH_STEPS}"]
        if step_range:
            overrides.append(f"sd35_flash.step_range={step_range[0]},{step_range[1]}")
        ckpt, training[name] = _train(name, _config(args.demo, overrides), work / name, writer, fork_from=parent)
        models[name] = (label, 4, ckpt)
    merged = work / "merged"
    if not (merged / "model.json").is_file():
        merge_checkpoints([models["branch-early"][2], models["branch-late"][2]], merged, force=True)
    models["merged"] = ("branches merged (0.5 / 0.5)", 4, merged)

    rows = {"reference renders": (None, 0),
            f"teacher, {TEACHER_STEPS} steps": (teacher, TEACHER_STEPS)}
    rows |= {label: (TextToImage.load(ckpt), steps) for label, steps, ckpt in models.values()}
    results, _, _ = score_models(rows, load_feature_net(args.demo / "feature_net"), SAMPLES_PER_PROMPT)
    metrics = {"models": results, "training": training, "samples_per_prompt": SAMPLES_PER_PROMPT,
               "branch_steps": BRANCH_STEPS, "wall_s": {"benchmark_s": time.perf_counter() - start}}
    outputs = [work / "metrics"] + ([REPO / "docs" / "images" / "sd35-flash-shapes-metrics"] if args.docs else [])
    write_metrics(metrics, *outputs)
    return metrics


def _student_updates(config) -> int:
    """The student updates of a configs/shapes.py:sd35 run (its generator phases)."""
    from s2flash_jax.recipes.base import phase_count

    cfg = config.sd35_flash
    return phase_count(config.train.steps, cfg.cycle, "generator", cfg.stages)


if __name__ == "__main__":
    main()
