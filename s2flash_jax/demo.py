"""`s2flash demo`: the whole method on the built-in shapes dataset, end to end on a CPU.

Stages (each skipped when its output is complete, so an interrupted demo resumes):
  1. data: shapes scenes rendered at 32x32, encoded by the space-to-depth autoencoder and the
     frozen word-level text encoder into ArrayRecord shards (the format `s2flash precompute` writes)
  2. teacher: a SANA-architecture flow model trained with flow matching (`s2flash train`, recipe
     flow_matching), exported as a model checkpoint
  3. student: the SANA-Sprint recipe (TrigFlow transform of the teacher, sCM + LADD) distils it;
     with --recipe tbcm also (or instead) TBCM, image-free on the teacher's own trajectories from a
     prompts-only dataset; with --recipe twinflow, TwinFlow fine-tunes a copy of the teacher into a
     few-step model with no teacher and no discriminator; with --recipe s2flash, S2-Flash distils
     an 8-step student adversarially (conv heads on the teacher's blocks, R1, sCM on its step set);
     with --recipe lcm-lora, LoRA adapters on a copy of the teacher learn latent consistency (LCM-LoRA);
     with --recipe sd35-flash, a 4-step student learns by distribution matching against a fake score,
     then also against an adversary on its intermediate states (SD3.5-Flash's two stages)
  4. eval: the held-out prompts sampled by the teacher (20 guided Euler steps; 1, 2 and 4 to show
     what few-step sampling gives without distillation) and the student
     (1, 2, 4 steps, S2-Flash's and LCM-LoRA's 1, 5, 8; and 1 step before distillation), read back by the analytic
     checker, compared with real renders by a Fréchet distance, timed. With --unsaid-positions the
     prompts sometimes leave an object's cell unsaid (shapes.py), so a caption maps to many images.

OUT/
  data/  text_encoder/  feature_net/            shared inputs (prompts/: captions only, for TBCM)
  teacher/ (run) teacher/model/ (checkpoint)     student/ (run) student/model/ (checkpoint)
  student-tbcm/ (run, model/)                    with --recipe tbcm
  student-twinflow/ (run, model/)                with --recipe twinflow
  student-s2flash/ (run, model/)                 with --recipe s2flash
  student-lcm-lora/ (run, model/)                with --recipe lcm-lora
  student-sd35-flash/ (run, model/)              with --recipe sd35-flash
  grid.png  metrics.json  metrics.md  tensorboard/ (eval scalars; each run has its own logs)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from s2flash_jax.config import Config, ConfigError, load_config
from s2flash_jax.data import shapes
from s2flash_jax.data.records import read_dataset_info, write_shards
from s2flash_jax.eval.alignment import score
from s2flash_jax.eval.frechet import (
    frechet_distance, image_features, load_feature_net, patch_crops, save_feature_net, train_feature_net)
from s2flash_jax.models.space_to_depth import SpaceToDepthAutoencoder, SpaceToDepthConfig
from s2flash_jax.models.text_encoder import FrozenTextEncoder, TextEncoderConfig, WordTokenizer
from s2flash_jax.outputs import OutputExists
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.pipeline import TextToImage
from s2flash_jax.recipes.registry import demo_entries
from s2flash_jax.storage import PathLike, is_remote, resolve
from s2flash_jax.train.loop import STEP_MEMORY, train_and_export
from s2flash_jax.train.state import create_train_state, product_params

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.py"
DATA_SEED = 0
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = 20
GRID_PROMPTS = 8
BEFORE_DISTILLATION = "student before distillation, 1 step"
UNSAID_POSITION_RATE = 0.25  # with --unsaid-positions: the share of training objects whose cell the prompt leaves out
IMAGE_SIZE = 32


# The recipes the demo can distil with, by demo name (`--recipe`): recipes/registry.py.
RECIPES = demo_entries()


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much work each stage does."""

    records: int
    samples_per_prompt: int
    feature_net_steps: int


SIZES = {"full": DemoSize(records=20_000, samples_per_prompt=4, feature_net_steps=1500),
         "quick": DemoSize(records=2_048, samples_per_prompt=1, feature_net_steps=150)}


def run_shapes_demo(out: PathLike, *, quick: bool = False, force: bool = False,
                    recipes: tuple[str, ...] = ("sana-sprint",), unsaid_positions: bool = False) -> dict:
    """Run (or resume) every stage into `out`, distilling with each of `recipes` (keys of RECIPES);
    returns the metrics written to metrics.json. unsaid_positions: training prompts leave each
    object's cell unsaid with probability UNSAID_POSITION_RATE, and the held-out one-object prompts
    leave theirs unsaid (shapes.heldout_scenes)."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ConfigError(f"--recipe {','.join(recipes)!r}: expected one or more of {', '.join(RECIPES)}")
    out = resolve(out)
    if is_remote(out):
        raise ConfigError(f"--out {str(out)!r}: the demo is a local run (it writes its dataset with local writers); "
                          "give a local directory (train, export and sample take object-store paths)")
    size = SIZES["quick" if quick else "full"]
    variant = ",quick" if quick else ""
    if out.exists() and force:
        shutil.rmtree(out)
    marker = out / "demo.json"
    kind = {"quick": quick, "unsaid_positions": unsaid_positions}
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise OutputExists(f"{out} exists and is not a demo directory; choose another --out or pass --force")
        held = {"unsaid_positions": False} | json.loads(marker.read_text())
        if held != kind:
            raise OutputExists(f"{out} holds a demo of {held}, not {kind}; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(kind) + "\n")
    clock = {}

    start = time.perf_counter()
    teacher_config = load_config(f"{CONFIG}:teacher{variant}", [f"data.path={out / 'data'}"])
    text_encoder = _text_encoder(out / "text_encoder", teacher_config)
    unsaid_rate = UNSAID_POSITION_RATE if unsaid_positions else 0.0
    autoencoder = _write_dataset(out / "data", text_encoder, size.records,
                                 factor=IMAGE_SIZE // teacher_config.model.sample_size, unsaid_position_rate=unsaid_rate)
    feature_net = _feature_net(out / "feature_net", size.feature_net_steps)
    if any(RECIPES[r].prompts_only for r in recipes):
        _write_dataset(out / "prompts", text_encoder, size.records, factor=IMAGE_SIZE // teacher_config.model.sample_size,
                       latents=False, unsaid_position_rate=unsaid_rate)
    clock["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    teacher_ckpt = train_and_export("teacher", teacher_config, out / "teacher",
                                    **component_writer(out / "text_encoder", autoencoder, teacher_config))
    clock["teacher_s"] = time.perf_counter() - start

    students, training, configs = {}, {}, {}
    for recipe in recipes:
        entry = RECIPES[recipe]
        run_name, label = entry.run, entry.label
        start = time.perf_counter()
        student_config = load_config(
            f"{CONFIG}:{','.join(t for t in (entry.variant, variant.lstrip(',')) if t)}",
            [f"data.path={out / ('prompts' if entry.prompts_only else 'data')}", f"train.teacher_checkpoint={teacher_ckpt}"])
        configs[label] = student_config
        students[label] = train_and_export(run_name, student_config, out / run_name,
                                           **component_writer(out / "text_encoder", autoencoder, student_config))
        clock[f"{run_name}_s"] = time.perf_counter() - start
        measured = out / run_name / STEP_MEMORY  # absent for a run trained before it was recorded
        training[recipe] = {"steps": student_config.train.steps, "batch_size": student_config.train.batch_size,
                            **(json.loads(measured.read_text()) if measured.is_file() else {})}

    start = time.perf_counter()
    steps = {RECIPES[recipe].label: RECIPES[recipe].steps for recipe in recipes}
    metrics = _evaluate(out, teacher_ckpt, students, configs, steps, feature_net, size, unsaid_positions)
    clock["eval_s"] = time.perf_counter() - start
    metrics["wall_s"] = clock
    metrics["training"] = training
    write_metrics(metrics, out / "metrics")
    print(f"wrote {out / 'grid.png'}")
    return metrics


def write_metrics(metrics: dict, *stems: Path) -> None:
    """`metrics` as STEM.json and its tables (metrics_table) as STEM.md, for each stem; prints the
    tables and the files written."""
    table = metrics_table(metrics)
    for stem in stems:
        stem.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table)
    print(table)
    print("wrote " + ", ".join(str(stem.with_suffix(suffix)) for stem in stems for suffix in (".md", ".json")))


def _text_encoder(path: Path, config: Config) -> FrozenTextEncoder:
    if not path.is_dir():
        tokenizer = WordTokenizer.from_vocabulary(shapes.VOCABULARY, max_length=config.data.caption_length)
        FrozenTextEncoder(tokenizer, TextEncoderConfig(vocab_size=tokenizer.vocab_size,
                                                       width=config.model.caption_channels,
                                                       max_length=config.data.caption_length)).save(path)
    return FrozenTextEncoder.load(path)


def _write_dataset(path: Path, text_encoder: FrozenTextEncoder, count: int, factor: int, batch: int = 512,
                   latents: bool = True, unsaid_position_rate: float = 0.0):
    """Training shards of `count` scenes (their captions only without `latents`); the autoencoder's
    scaling factor makes the latents unit-variance."""
    info = read_dataset_info(path)
    if info is not None and info.get("num_records") == count:
        return SpaceToDepthAutoencoder(SpaceToDepthConfig(**info["autoencoder"]))
    probe = shapes.render_batch(shapes.scenes(DATA_SEED, 0, batch), seed=DATA_SEED)
    raw = SpaceToDepthAutoencoder(SpaceToDepthConfig(factor=factor)).encode(probe)
    autoencoder = SpaceToDepthAutoencoder(SpaceToDepthConfig(factor=factor, scaling_factor=float(1.0 / np.std(raw))))

    def records():
        for start in tqdm(range(0, count, batch), desc="shapes dataset", unit="batch"):
            scenes = shapes.scenes(DATA_SEED, start, min(batch, count - start), unsaid_position_rate)
            prompts = [shapes.prompt(s) for s in scenes]
            encoded = [None] * len(prompts)
            if latents:
                encoded = np.asarray(autoencoder.encode(shapes.render_batch(scenes, seed=DATA_SEED + start)))
                encoded = encoded * autoencoder.config.scaling_factor
            embeddings, mask = text_encoder(prompts)
            for i, text in enumerate(prompts):
                yield {"latent": encoded[i], "caption_embedding": embeddings[i], "caption_mask": mask[i],
                       "caption": text}

    write_shards(records(), path, records_per_shard=4096, num_records=count,
                 info={"autoencoder": dataclasses.asdict(autoencoder.config), "text_encoder": "shapes word encoder"})
    return autoencoder


def _feature_net(path: Path, steps: int):
    if not path.exists():
        save_feature_net(train_feature_net(seed=DATA_SEED, steps=steps, log=print), path)
    return load_feature_net(path)


def component_writer(text_encoder_dir: Path, autoencoder: SpaceToDepthAutoencoder, config: Config):
    """What every exported demo model carries: its text encoder, autoencoder and sampling defaults."""
    metadata = {"text_encoder": "text_encoder",
                "autoencoder": {"kind": "space_to_depth", **dataclasses.asdict(autoencoder.config)},
                "sampling": {"guidance_scale": config.sample.guidance_scale, "flow_shift": config.sample.flow_shift}}

    def write(staging: Path) -> None:
        shutil.copytree(text_encoder_dir, staging / "text_encoder")

    return {"metadata": metadata, "write_components": write}


def _evaluate(out: Path, teacher_ckpt: Path, students: dict[str, Path], configs: dict[str, Config],
              steps: dict[str, tuple[int, ...]], feature_net, size: DemoSize, unsaid_positions: bool) -> dict:
    """students, configs, steps: row label -> checkpoint, the config that trained it, the step counts
    it is sampled at. The first recipe's student also gets a row before any update: where its
    distillation starts; and the teacher rows at STUDENT_STEPS: what few-step sampling gives without
    distillation. Neither is drawn in the grid."""
    teacher = TextToImage.load(teacher_ckpt)
    loaded = {label: TextToImage.load(ckpt) for label, ckpt in students.items()}
    first = next(iter(students))
    _, initial, _ = create_train_state(configs[first], make_mesh(configs[first].mesh))
    before = dataclasses.replace(loaded[first], params=product_params(initial, "student"))

    few_step_teacher = student_rows("teacher", teacher)
    not_drawn = {*few_step_teacher, BEFORE_DISTILLATION}
    rows = ({"reference renders": (None, 0), f"teacher, {TEACHER_STEPS} steps": (teacher, TEACHER_STEPS)}
            | few_step_teacher | {BEFORE_DISTILLATION: (before, 1)})
    for label, student in loaded.items():
        rows |= student_rows(label, student, steps[label])
    results, grid_columns, prompts = score_models(rows, feature_net, size.samples_per_prompt, unsaid_positions)
    _sample_grid(prompts[:GRID_PROMPTS], {label: images for label, images in grid_columns.items()
                                          if label not in not_drawn}).save(out / "grid.png")
    _log_scalars(out / "tensorboard", results)
    return {"models": results, "heldout_prompts": len(prompts) // size.samples_per_prompt,
            "samples_per_prompt": size.samples_per_prompt, "teacher_steps_trained": _run_steps(out / "teacher")}


def student_rows(label: str, student: TextToImage,
                 steps: tuple[int, ...] = STUDENT_STEPS) -> dict[str, tuple[TextToImage, int]]:
    """The evaluation rows of a few-step model, one per step count (1, 2 and 4 unless told)."""
    return {f"{label}, {n} step{'s' if n > 1 else ''}": (student, n) for n in steps}


def score_models(rows: dict[str, tuple[TextToImage | None, int]], feature_net, samples_per_prompt: int,
                 unsaid_positions: bool = False) -> tuple[dict[str, dict], dict[str, np.ndarray], list[str]]:
    """Sample the held-out prompts (samples_per_prompt seeds each) with every row's model at its
    step count (None: reference renders of other seeds) and score them: alignment accuracy by
    attribute, Fréchet distance to renders over whole images and over their 16 px crops
    (eval/frechet.patch_crops), images/s. unsaid_positions: the held-out one-object prompts leave
    their cell unsaid, and each reference render puts it in a cell of its own seed's choosing.
    Returns (results by label, the first GRID_PROMPTS images by label, the prompts)."""
    scenes = shapes.heldout_scenes(unsaid_positions)
    prompts = [shapes.prompt(s) for s in scenes] * samples_per_prompt
    all_scenes = scenes * samples_per_prompt
    reference = shapes.render_batch(shapes.place_unsaid(all_scenes, seed=12345), seed=12345)
    reference_features = image_features(feature_net, reference)
    reference_patches = image_features(feature_net, patch_crops(reference))
    results, grid_columns = {}, {}
    for label, (pipeline, steps) in tqdm(rows.items(), desc="evaluating", unit="model"):
        timings = {}
        if pipeline is None:
            images = shapes.render_batch(shapes.place_unsaid(all_scenes, seed=54321), seed=54321)
        else:
            images = pipeline.generate(prompts, steps=steps, seed=0, timings=timings)
        alignment = score(images, all_scenes)
        results[label] = {**{f"accuracy/{k}": v for k, v in alignment.items()},
                          "frechet": frechet_distance(image_features(feature_net, images), reference_features),
                          "frechet_patch": frechet_distance(image_features(feature_net, patch_crops(images)),
                                                            reference_patches),
                          **({"images_per_s": timings["images"] / timings["seconds"]} if timings else {})}
        grid_columns[label] = images[:GRID_PROMPTS]
    return results, grid_columns, prompts


def _run_steps(run_dir: Path) -> int:
    return json.loads((run_dir / "config.json").read_text())["train"]["steps"]


def _sample_grid(prompts: list[str], columns: dict[str, np.ndarray], scale: int = 3) -> Image.Image:
    """Rows: prompts (their text on the left); columns: one per model, headed by its label."""
    labels = list(columns)
    cell = next(iter(columns.values())).shape[1] * scale
    text_width, header, gap = 330, 28, 4
    grid = Image.new("RGB", (text_width + len(labels) * (cell + gap), header + len(prompts) * (cell + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((text_width + j * (cell + gap), 2), label.replace(", ", "\n"), fill="black")
        for i, image in enumerate(columns[label]):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).resize((cell, cell),
                                                                                                   Image.NEAREST)
            grid.paste(tile, (text_width + j * (cell + gap), header + i * (cell + gap)))
    for i, text in enumerate(prompts):
        draw.text((4, header + i * (cell + gap) + cell // 3), text.replace(" and ", "\nand "), fill="black")
    return grid


def _log_scalars(path: Path, results: dict) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for label, values in results.items():
            for key, value in values.items():
                writer.add_scalar(f"eval/{label}/{key}", value, 0)


def metrics_table(metrics: dict) -> str:
    keys = ("prompt", "colour", "shape", "size", "position", "count")
    lines = ["| model | " + " | ".join(f"{k} acc." for k in keys) + " | Fréchet dist. | patch Fréchet | images/s |",
             "|---" * (len(keys) + 4) + "|"]
    for label, values in metrics["models"].items():
        rate, patch = values.get("images_per_s"), values.get("frechet_patch")  # absent in older metrics
        lines.append(f"| {label} | " + " | ".join(f"{values[f'accuracy/{k}']:.1%}" for k in keys)
                     + f" | {values['frechet']:.2f} | {'' if patch is None else f'{patch:.2f}'} | "
                     + f"{'' if rate is None else f'{rate:,.0f}'} |")
    training = metrics.get("training", {})
    if training:
        lines += ["", "| distillation | updates | batch | train time | peak step memory |", "|---|---|---|---|---|"]
        lines += [f"| {recipe} | {t['steps']} | {t['batch_size']} | "
                  + (f"{t['train_s']:.0f}s | {t['step_peak_mb']:.0f} MiB |" if "train_s" in t else "? | ? |")
                  for recipe, t in training.items()]
    wall = metrics.get("wall_s", {})
    if wall:
        lines.append("")
        lines.append("Wall time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in wall.items())
                     + f"; total {sum(wall.values()):.0f}s")
    return "\n".join(lines) + "\n"
