"""Teacher preparation on the shapes demo: does a teacher trained in base SANA's conventions (no
QK-norm, time embedder fed 1000·s), prepared by `s2flash prepare-teacher`, work as well as one
trained in the Sprint conventions from the start?

Reuses a full `s2flash demo` directory (its data, text encoder, Fréchet feature net, dense-
convention teacher and SANA-Sprint student; the demo is run first if it is missing), then:
  1. trains the legacy teacher, same steps and data (configs/shapes.py:teacher,legacy)
  2. prepares it (configs/shapes.py:prepare), measuring its velocity distance to the original on
     the held-out prompts' latents
  3. distils a SANA-Sprint student from the prepared teacher (configs/shapes.py)
  4. scores, on the demo's held-out prompts: the dense teacher, the legacy teacher and the prepared
     teacher (20 guided steps), and the students of the dense and the prepared teacher (1, 2, 4)
Writes DEMO/prepare-teacher/{metrics.json, metrics.md}; every stage resumes when rerun.

  python benchmarks/prepare_teacher_shapes.py [--demo runs/shapes-demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from s2flash_jax.config import load_config  # noqa: E402
from s2flash_jax.data import shapes  # noqa: E402
from s2flash_jax.data.records import read_dataset_info, write_shards  # noqa: E402
from s2flash_jax.demo import (CONFIG, IMAGE_SIZE, TEACHER_STEPS, component_writer, metrics_table,  # noqa: E402
                              run_shapes_demo, score_models, student_rows)
from s2flash_jax.eval.frechet import load_feature_net  # noqa: E402
from s2flash_jax.models.space_to_depth import SpaceToDepthAutoencoder, SpaceToDepthConfig  # noqa: E402
from s2flash_jax.models.text_encoder import FrozenTextEncoder  # noqa: E402
from s2flash_jax.pipeline import TextToImage  # noqa: E402
from s2flash_jax.prepare_teacher import report_table, run_prepare_teacher  # noqa: E402
from s2flash_jax.train.loop import train_and_export  # noqa: E402

SAMPLES_PER_PROMPT = 4


def heldout_latents(demo: Path, out: Path) -> Path:
    """The held-out prompts' renders as training records (latents + captions), for the velocity report."""
    if read_dataset_info(out) is not None:
        return out
    info = read_dataset_info(demo / "data")
    autoencoder = SpaceToDepthAutoencoder(SpaceToDepthConfig(**info["autoencoder"]))
    text_encoder = FrozenTextEncoder.load(demo / "text_encoder")
    scenes = shapes.heldout_scenes()
    prompts = [shapes.prompt(s) for s in scenes]
    latents = np.asarray(autoencoder.encode(shapes.render_batch(scenes, size=IMAGE_SIZE, seed=777)))
    latents = latents * autoencoder.config.scaling_factor
    embeddings, mask = text_encoder(prompts)
    records = ({"latent": latents[i], "caption_embedding": embeddings[i], "caption_mask": mask[i], "caption": p}
               for i, p in enumerate(prompts))
    write_shards(records, out, records_per_shard=len(prompts), num_records=len(prompts),
                 info={"autoencoder": info["autoencoder"], "text_encoder": "shapes word encoder"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/shapes-demo", help="a full shapes demo directory (run if missing)")
    args = parser.parse_args()
    demo = Path(args.demo)
    if not (demo / "metrics.json").is_file():
        run_shapes_demo(demo)
    work = demo / "prepare-teacher"
    data = [f"data.path={demo / 'data'}"]
    clock = {}

    start = time.perf_counter()
    autoencoder = SpaceToDepthAutoencoder(SpaceToDepthConfig(**read_dataset_info(demo / "data")["autoencoder"]))
    legacy_config = load_config(f"{CONFIG}:teacher,legacy", data)
    legacy = train_and_export("legacy teacher", legacy_config, work / "teacher-legacy",
                              **component_writer(demo / "text_encoder", autoencoder, legacy_config))
    clock["legacy_teacher_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prepared = work / "teacher-prepared"
    prepare_config = load_config(f"{CONFIG}:prepare",
                                 [*data, f"prepare_teacher.eval_path={heldout_latents(demo, work / 'heldout')}"])
    if not (prepared / "model.json").is_file():
        run_prepare_teacher(prepare_config, legacy, prepared, work=work / "prepare-work")
    report = json.loads((work / "prepare-work" / "report.json").read_text())
    clock["prepare_s"] = time.perf_counter() - start

    start = time.perf_counter()
    student_config = load_config(str(CONFIG), [*data, f"train.teacher_checkpoint={prepared}"])
    student = train_and_export("student of the prepared teacher", student_config, work / "student-prepared",
                               **component_writer(demo / "text_encoder", autoencoder, student_config))
    clock["student_s"] = time.perf_counter() - start

    start = time.perf_counter()
    teachers = {"teacher (dense convention from the start)": demo / "teacher" / "model",
                "teacher (base SANA convention)": legacy, "teacher (base SANA convention, prepared)": prepared}
    rows = {f"{label}, {TEACHER_STEPS} steps": (TextToImage.load(ckpt), TEACHER_STEPS)
            for label, ckpt in teachers.items()}
    rows |= student_rows("student of the dense teacher", TextToImage.load(demo / "student" / "model"))
    rows |= student_rows("student of the prepared teacher", TextToImage.load(student))
    results, _, _ = score_models(rows, load_feature_net(demo / "feature_net"), SAMPLES_PER_PROMPT)
    clock["eval_s"] = time.perf_counter() - start

    metrics = {"models": results, "preparation": report, "wall_s": clock,
               "steps": {"teacher": legacy_config.train.steps,
                         "prepare": {"embedding": prepare_config.prepare_teacher.embedding_steps,
                                     "full": prepare_config.prepare_teacher.full_steps},
                         "student": student_config.train.steps}}
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = metrics_table(metrics) + "\n" + report_table(report)
    (work / "metrics.md").write_text(table)
    print(table)
    accuracy = {label: values["accuracy/prompt"] for label, values in results.items()}
    legacy_acc, prepared_acc = (accuracy[f"{label}, {TEACHER_STEPS} steps"] for label in list(teachers)[1:])
    print(f"prepared / original teacher prompt accuracy: {prepared_acc / legacy_acc:.1%} (goal >= 95%)")


if __name__ == "__main__":
    main()
