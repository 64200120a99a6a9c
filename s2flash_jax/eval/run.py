"""`s2flash eval`: generate a prompt set with a model checkpoint at several step counts, score every
setting (FID and patch FID against reference statistics, CLIP score) and write a table; optionally
export the images in the layout the official GenEval / MJHQ-30K evaluators read.

Work streams in chunks of `EvalOptions.chunk` images: each chunk is generated (`TextToImage.generate`,
batched over the local devices), its Inception features go into running statistics on the devices
(`eval.fid.FeatureStatistics`), its CLIP scores are kept, its PNGs are written, and it is dropped, so
30,000 images at 1024 px never sit in memory together. Chunk c is generated with its own seed,
derived from (seed, index of its first image), so image i depends on the seed, i and the chunk size
(recorded in metrics.json); every step count sees the same seeds.

Reference statistics come from `--ref-stats` (a .npz from an earlier `--save-ref-stats`, or
pytorch-fid's / clean-fid's own) or are computed from `--ref-images` (a folder, searched
recursively, e.g. MJHQ's mjhq30k_imgs/); without `--ckpt` the command only computes and saves them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from s2flash_jax import arguments
from s2flash_jax.config import ConfigError
from s2flash_jax.data.precompute import IMAGE_EXTENSIONS
from s2flash_jax.eval import export as prompt_sets
from s2flash_jax.eval.fid import (FeatureStatistics, Statistics, StatisticsError, convention_mismatch, fid,
                                  load_statistics, save_statistics)
from s2flash_jax.eval.inception import (CLEAN, FEATURES, INPUT_SIZE, PATCH_LAYOUTS, RESIZE_MODES, InceptionFeatures,
                                        crop_patches, patch_origins)
from s2flash_jax.outputs import OutputExists, fresh_output_dir
from s2flash_jax.outputs import to_uint8

NO_PATCHES = "none"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """steps: the step counts to sample with; images_per_prompt: None for the prompt set's default
    (4 for GenEval, else 1); batch_size: prompts per generation batch (None: the pipeline's default);
    chunk: images generated, scored and written at a time; patch_layout: crops for patch FID, or None."""

    steps: tuple[int, ...] = (1, 2, 4)
    seed: int = 0
    images_per_prompt: int | None = None
    batch_size: int | None = None
    chunk: int = 64
    guidance_scale: float | None = None
    patch_layout: str | None = "center"

    def __post_init__(self):
        problems = [f"--steps {s} must be >= 1" for s in self.steps if s < 1]
        if not self.steps:
            problems.append("--steps names no step count")
        if self.images_per_prompt is not None and self.images_per_prompt < 1:
            problems.append(f"--images-per-prompt {self.images_per_prompt} must be >= 1")
        if self.chunk < 1 or (self.batch_size is not None and self.batch_size < 1):
            problems.append(f"chunk ({self.chunk}) and --batch-size ({self.batch_size}) must be >= 1")
        if self.patch_layout is not None and self.patch_layout not in PATCH_LAYOUTS:
            problems.append(f"--patch-fid {self.patch_layout!r} is not one of {', '.join(PATCH_LAYOUTS)}, {NO_PATCHES}")
        if problems:
            raise ConfigError("; ".join(problems))


def chunk_seed(seed: int, first_image: int) -> int:
    """The generation seed of the chunk whose first image is `first_image`."""
    return int(np.random.SeedSequence([seed, first_image]).generate_state(1)[0] >> 1)


def image_files(folder: str | Path) -> list[Path]:
    """The images under `folder` (recursively, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--ref-images {str(root)!r} is not a folder; expected a folder of reference images "
                          "(e.g. MJHQ-30K's mjhq30k_imgs/)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise ConfigError(f"--ref-images {str(root)!r} holds {len(files)} {'/'.join(IMAGE_EXTENSIONS)} images; FID "
                          "needs at least 2")
    return files


class _Scorer:
    """Running whole-image and patch statistics of one image set under one extractor."""

    def __init__(self, extractor: InceptionFeatures, patch_layout: str | None):
        self.extractor, self.patch_layout = extractor, patch_layout
        self.whole, self.patches = FeatureStatistics(FEATURES), FeatureStatistics(FEATURES)
        self.patch_note: str | None = None

    def add(self, images: Sequence[np.ndarray]) -> None:
        """images: uint8 [H, W, 3] arrays, any sizes (grouped by size for the device)."""
        groups: dict[tuple[int, ...], list[np.ndarray]] = {}
        for image in images:
            groups.setdefault(image.shape, []).append(image)
        for (height, width, _), group in groups.items():
            batch = np.stack(group)
            for features, count in self.extractor(batch):
                self.whole.add(features, count)
            if self.patch_layout is None:
                continue
            try:
                origins = patch_origins(height, width, self.patch_layout)
            except ValueError as e:
                self.patch_note = str(e)
                continue
            for features, count in self.extractor(crop_patches(batch, origins)):
                self.patches.add(features, count)

    def statistics(self, meta: dict[str, Any]) -> Statistics:
        return Statistics.from_running(self.whole, self.patches if self.patch_layout else None, meta)


def fid_meta(extractor: InceptionFeatures, patch_layout: str | None) -> dict[str, Any]:
    """How features are made: statistics with different values here are not compared."""
    return {"resize": extractor.resize, "patch_layout": patch_layout, "patch_size": INPUT_SIZE,
            "network": "pytorch-fid InceptionV3 pool3"}


def reference_statistics(folder: str | Path, extractor: InceptionFeatures, patch_layout: str | None,
                         chunk: int = 64) -> Statistics:
    """Statistics of the images under `folder` (RGB as pytorch-fid and clean-fid read them)."""
    files = image_files(folder)
    scorer = _Scorer(extractor, patch_layout)
    with tqdm(total=len(files), desc="reference images", unit="img") as progress:
        for start in range(0, len(files), chunk):
            images = []
            for path in files[start:start + chunk]:
                try:
                    with Image.open(path) as opened:
                        images.append(np.asarray(opened.convert("RGB")))
                except OSError as e:
                    raise ConfigError(f"cannot read reference image {path} ({e})") from None
            scorer.add(images)
            progress.update(len(images))
    if scorer.patch_note and scorer.patches.count == 0:
        print(f"reference images: no patch statistics ({scorer.patch_note})", flush=True)
    return scorer.statistics({**fid_meta(extractor, patch_layout), "images": len(files), "source": str(folder)})


def run_eval(ckpt: str | Path, kind: str, entries: Sequence[prompt_sets.PromptEntry], out: str | Path, *,
             options: EvalOptions = EvalOptions(), extractor: InceptionFeatures | None = None,
             reference: Statistics | None = None, clip=None, export: str | Path | None = None, force: bool = False,
             text_encoder=None, autoencoder=None, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Generate `entries` (prompt set `kind`) at every step count, score and write `out`/metrics.json and
    metrics.md (and the images under `export`). extractor + reference: FID (and patch FID when both
    have patches); clip: a `ClipScorer`. Returns the metrics."""
    from s2flash_jax.pipeline import TextToImage

    if extractor is not None and reference is None:
        raise ConfigError("FID needs reference statistics: pass --ref-stats or --ref-images with --inception")
    if extractor is None and clip is None and export is None:
        raise ConfigError("nothing to do: pass --inception (FID), --clip (CLIP score) and/or --export")
    if extractor is not None:
        _check_comparable(reference, extractor, options.patch_layout)
    per_prompt = options.images_per_prompt or prompt_sets.DEFAULT_IMAGES_PER_PROMPT[kind]
    prompts = [entry.prompt for entry in entries for _ in range(per_prompt)]
    pipeline = TextToImage.load(ckpt, text_encoder=text_encoder, autoencoder=autoencoder)
    if options.guidance_scale is not None:
        pipeline = dataclasses.replace(pipeline, guidance_scale=options.guidance_scale)
    batch = pipeline.batch_size_for(min(len(prompts), options.chunk), options.batch_size)
    settings = {"checkpoint": str(ckpt), **(sources or {}), "seed": options.seed, "chunk": options.chunk,
                "batch_size": batch, "guidance_scale": pipeline.guidance_scale, "images_per_prompt": per_prompt}
    metrics: dict[str, Any] = {
        "prompts": {"set": kind, "count": len(entries), "images_per_prompt": per_prompt},
        "settings": settings, "fid": None, "results": {}}
    if extractor is not None:
        metrics["fid"] = {**fid_meta(extractor, options.patch_layout),
                          "reference": {k: v for k, v in reference.meta.items() if k in ("images", "source")}
                          | {"count": reference.count, "patch_count": reference.patch_count}}

    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(fresh_output_dir(out, force=force))
        export_staging = stack.enter_context(fresh_output_dir(export, force=force)) if export is not None else None
        for steps in options.steps:
            metrics["results"][str(steps)] = _evaluate_setting(
                pipeline, kind, entries, prompts, steps, per_prompt, options, batch, extractor, reference, clip,
                export_staging / f"steps_{steps}" if export_staging is not None else None,
                {**settings, "steps": steps})
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "metrics.md").write_text(metrics_table(metrics))
    print(metrics_table(metrics))
    print(f"wrote {Path(out) / 'metrics.md'}, {Path(out) / 'metrics.json'}"
          + (f"; the images under {export}" if export is not None else ""), flush=True)
    return metrics


def _check_comparable(reference: Statistics, extractor: InceptionFeatures, patch_layout: str | None) -> None:
    """Refuse, before generating anything, a reference made under another convention than `fid` will
    find this run's statistics made under."""
    mismatch = convention_mismatch(reference.meta, fid_meta(extractor, patch_layout),
                                   patches=patch_layout is not None and reference.patch_mean is not None)
    if mismatch:
        key, theirs, mine = mismatch
        raise ConfigError(f"the reference statistics were made with {key}={theirs!r}, this run uses {mine!r}; "
                          f"pass --{'fid-resize' if key == 'resize' else 'patch-fid'} {theirs} or make new "
                          "reference statistics")


def _evaluate_setting(pipeline, kind, entries, prompts, steps, per_prompt, options, batch, extractor, reference, clip,
                      export_root, settings) -> dict[str, Any]:
    """Generate, score and export every image at one step count."""
    scorer = _Scorer(extractor, options.patch_layout) if extractor is not None else None
    exporter = (prompt_sets.Exporter(kind, export_root, entries, per_prompt, settings)
                if export_root is not None else None)
    clip_scores, seconds = [], 0.0
    size = None
    with tqdm(total=len(prompts), desc=f"{steps} step{'s' if steps > 1 else ''}", unit="img") as progress:
        for start in range(0, len(prompts), options.chunk):
            chunk = prompts[start:start + options.chunk]
            timings: dict[str, float] = {}
            images = pipeline.generate(chunk, steps=steps, seed=chunk_seed(options.seed, start),
                                       batch_size=batch, timings=timings)
            seconds += timings["seconds"]
            size = images.shape[1:3]
            if scorer is not None:
                scorer.add(list(to_uint8(images)))
            if clip is not None:
                clip_scores.append(clip(images, chunk))
            if exporter is not None:
                exporter.add(images, start)
            progress.update(len(chunk))
    if exporter is not None:
        exporter.finish()
    result: dict[str, Any] = {"images": len(prompts), "image_size": list(size), "generation_s": seconds,
                              "images_per_s": len(prompts) / seconds if seconds > 0 else None}
    if scorer is not None:
        generated = scorer.statistics(fid_meta(extractor, options.patch_layout))
        result["fid"] = fid(generated, reference) if generated.count >= 2 else None
        if generated.patch_mean is not None and reference.patch_mean is not None:
            result["patch_fid"] = fid(generated, reference, patches=True)
        elif options.patch_layout is not None:
            result["patch_fid"] = None
            result["patch_fid_note"] = scorer.patch_note or "the reference statistics have no patch statistics"
    if clip is not None:
        result["clip_score"] = float(np.concatenate(clip_scores).mean())
    return result


def metrics_table(metrics: dict[str, Any]) -> str:
    """metrics.md: one row per step count."""
    prompts, fid_info = metrics["prompts"], metrics.get("fid")
    lines = [f"# s2flash eval: {metrics['settings']['checkpoint']}", "",
             f"{prompts['count']} {prompts['set']} prompts x {prompts['images_per_prompt']} image(s), seed "
             f"{metrics['settings']['seed']}, guidance scale {metrics['settings']['guidance_scale']}."]
    if fid_info:
        ref = fid_info["reference"]
        lines.append(f"FID: {fid_info['network']}, resize {fid_info['resize']!r}, against {ref['count']} reference "
                     f"images{' (' + ref['source'] + ')' if ref.get('source') else ''}; patch FID: "
                     f"{fid_info['patch_layout'] or 'off'} {fid_info['patch_size']}px crops at full resolution.")
    lines += ["", "| steps | images | FID | patch FID | CLIP score | images/s |", "|---|---|---|---|---|---|"]

    def number(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    notes = []
    for steps, r in metrics["results"].items():
        lines.append(f"| {steps} | {r['images']} | {number(r.get('fid'))} | {number(r.get('patch_fid'))} | "
                     f"{number(r.get('clip_score'))} | {number(r.get('images_per_s'), 1)} |")
        if r.get("patch_fid_note"):
            notes.append(f"patch FID at {steps} steps: {r['patch_fid_note']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="model checkpoint directory (e.g. runs/shapes-demo/student/model); without it "
                                       "the command only computes --ref-images statistics into --save-ref-stats")
    parser.add_argument("--prompts", metavar="{mjhq,geneval,file}",
                        help="prompt set: mjhq (MJHQ-30K's meta_data.json), geneval (GenEval's "
                             "evaluation_metadata.jsonl) or file (one prompt per line), read from --prompts-path")
    parser.add_argument("--prompts-path", metavar="PATH", help="the local prompt set file (nothing is downloaded)")
    parser.add_argument("--limit", type=arguments.count(1), default=None, metavar="N",
                        help="use N prompts spread evenly through the set (a quick run)")
    parser.add_argument("--steps", default="1,2,4", help="comma-separated step counts (default 1,2,4)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--images-per-prompt", type=arguments.count(1), default=None, metavar="K",
                        help="images per prompt (default: 4 for geneval, as GenEval scores them, else 1)")
    parser.add_argument("--batch-size", type=arguments.count(1), default=None, metavar="N", help="prompts per generation batch")
    parser.add_argument("--chunk", type=arguments.count(1), default=EvalOptions.chunk, metavar="N",
                        help=f"images generated, scored and written at a time (default {EvalOptions.chunk}); image "
                             "i's noise depends on the seed, i and N")
    parser.add_argument("--guidance-scale", type=arguments.real(0.0), default=None, help="override the checkpoint's guidance scale")
    parser.add_argument("--text-encoder", default=None, metavar="PATH", help="as for `s2flash sample --ckpt`")
    parser.add_argument("--vae", default=None, metavar="PATH", help="as for `s2flash sample --ckpt`")
    parser.add_argument("--inception", metavar="WEIGHTS",
                        help="FID: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its .safetensors/.npz "
                             "conversion (python -m conversion.inception), which needs no torch")
    parser.add_argument("--fid-resize", default=CLEAN, metavar="{clean,pytorch-fid}",
                        help="how images reach Inception's 299x299: clean (clean-fid: PIL bicubic, default) or "
                             "pytorch-fid (torch bilinear, no anti-aliasing); docs/evaluation.md")
    parser.add_argument("--patch-fid", default="center", metavar="{center,five,none}",
                        help="patch FID on fixed 299x299 crops at full resolution: center (default), five "
                             "(corners + center) or none; needs images of at least 299 px")
    parser.add_argument("--ref-stats", metavar="FILE.npz", help="reference statistics (--save-ref-stats, or "
                                                                "pytorch-fid's --save-stats)")
    parser.add_argument("--ref-images", metavar="DIR", help="compute reference statistics from these images")
    parser.add_argument("--save-ref-stats", metavar="FILE.npz", help="write the --ref-images statistics here")
    parser.add_argument("--clip", metavar="DIR", help="CLIP score with this transformers CLIP folder (e.g. a local "
                                                      "openai/clip-vit-large-patch14)")
    parser.add_argument("--out", help="directory for metrics.md and metrics.json")
    parser.add_argument("--export", metavar="DIR", help="also write the images (and their metadata) in the layout of "
                                                        "the prompt set's official evaluator, one steps_N/ per count")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")


def _steps(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--steps {spec!r}: expected comma-separated integers such as 1,2,4") from None


@dataclasses.dataclass(frozen=True)
class ScoringModels:
    """How `s2flash eval` reads its scoring networks: load_inception(weights path) -> InceptionV3 and
    load_clip_scorer(folder) -> ClipScorer. The CLI passes conversion/'s readers (the torch boundary
    lives there; s2flash_jax never imports it); tests may pass others."""

    load_inception: Callable[[str], Any]
    load_clip_scorer: Callable[[str], Any]


def run_eval_command(args: argparse.Namespace, models: ScoringModels, *, text_encoder=None, autoencoder=None,
                     sources: dict[str, str] | None = None) -> int:
    """`s2flash eval` (bad input raises ConfigError, PromptError, CheckpointError or OutputExists)."""
    try:
        return _run_eval_command(args, models, text_encoder, autoencoder, sources)
    except StatisticsError as e:
        raise ConfigError(str(e)) from e


def _run_eval_command(args, models, text_encoder, autoencoder, sources) -> int:
    if args.fid_resize not in RESIZE_MODES:
        raise ConfigError(f"--fid-resize {args.fid_resize!r} is not one of {', '.join(RESIZE_MODES)}")
    options = EvalOptions(steps=_steps(args.steps), seed=args.seed, images_per_prompt=args.images_per_prompt,
                          batch_size=args.batch_size, chunk=args.chunk, guidance_scale=args.guidance_scale,
                          patch_layout=None if args.patch_fid == NO_PATCHES else args.patch_fid)
    if args.ref_stats and args.ref_images:
        raise ConfigError("give --ref-stats or --ref-images, not both")
    if args.save_ref_stats and not args.ref_images:
        raise ConfigError("--save-ref-stats saves the statistics of --ref-images; pass --ref-images")
    if (args.ref_stats or args.ref_images) and not args.inception:
        raise ConfigError("reference statistics are for FID, which needs --inception WEIGHTS")
    for flag, path in (("--out", args.out), ("--export", args.export), ("--save-ref-stats", args.save_ref_stats)):
        if path and Path(path).exists() and not args.force and (Path(path).is_file() or any(Path(path).iterdir())):
            raise OutputExists(f"{flag} {path!r} already exists; pass --force to replace it")
    if args.ckpt is None:
        if not (args.ref_images and args.save_ref_stats):
            raise ConfigError("eval needs --ckpt (and --prompts, --out), or --ref-images with --save-ref-stats to "
                              "only compute reference statistics")
    else:
        if args.out is None or args.prompts is None:
            raise ConfigError("eval --ckpt needs --prompts {mjhq,geneval,file} (with --prompts-path) and --out")
        entries = prompt_sets.subset(prompt_sets.read_prompt_set(args.prompts, args.prompts_path), args.limit)
    clip = models.load_clip_scorer(args.clip) if args.clip else None
    extractor = reference = None
    if args.inception:
        extractor = InceptionFeatures(models.load_inception(args.inception), resize=args.fid_resize)
        if args.ref_stats:
            reference = load_statistics(args.ref_stats)
        elif args.ref_images:
            reference = reference_statistics(args.ref_images, extractor, options.patch_layout)
            if args.save_ref_stats:
                print(f"wrote {save_statistics(reference, args.save_ref_stats, force=args.force)}", flush=True)
    if args.ckpt is not None:
        run_eval(args.ckpt, args.prompts, entries, args.out, options=options, extractor=extractor, reference=reference,
                 clip=clip, export=args.export, force=args.force, text_encoder=text_encoder, autoencoder=autoencoder,
                 sources=sources)
    return 0
