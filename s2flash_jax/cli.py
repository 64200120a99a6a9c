"""`s2flash` command line: thin subcommands over the library.

Every subcommand takes `--config PATH[:ARG]` and trailing `key.sub=value` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from s2flash_jax.arguments import OneLineParser, count, real
from s2flash_jax.config import ConfigError, load_config
from s2flash_jax.data.precompute import add_precompute_arguments, run_precompute
from s2flash_jax.eval.run import add_eval_arguments
from s2flash_jax.outputs import OutputExists
from s2flash_jax.recipes.registry import demo_entries, recipe_entries
from s2flash_jax.storage import StorageError, resolve
from s2flash_jax.train.metrics import DEVICE_MEMORY


# `plan` simulates every device of the slice as a CPU device of this one process: 100,000 of them
# hung without a word, so the count is bounded (a v5p-8192 slice has 4096 chips).
MAX_PLAN_DEVICES = 4096


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally with a variant: configs/tiny.py[:ARG]")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.num_layers=2 sample.steps=2")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="s2flash", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser(
        "sample", help="sample images from a model checkpoint, or latents from a config's random model",
        description="With --ckpt: generate images for --prompt/--prompts-file from a model checkpoint and write "
                    "PNGs (the prompt and settings in their metadata). The text encoder and autoencoder are the "
                    "checkpoint's own (as `s2flash demo` exports them) or, for SANA / SANA-Sprint, Gemma-2 from "
                    "--text-encoder and the DC-AE from --vae (diffusers / transformers folders, read without torch). "
                    "With --config: sample latents from the config's randomly initialised transformer and write "
                    "latents.npy, preview.png and config.json.")
    sample.add_argument("--config", help="config file, optionally with a variant: configs/tiny.py[:ARG]")
    sample.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides (with --config), e.g. sample.steps=2")
    sample.add_argument("--ckpt", help="model checkpoint directory (e.g. runs/shapes-demo/student/model)")
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    sample.add_argument("--prompts-file", help="a text file with one prompt per line")
    sample.add_argument("--steps", type=count(1), default=1, help="sampling steps (with --ckpt; default 1)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (with --ckpt)")
    sample.add_argument("--guidance-scale", type=real(0.0), default=None,
                        help="override the checkpoint's guidance scale (with --ckpt; default: the checkpoint's, else "
                             "4.5 as SanaSprintPipeline)")
    sample.add_argument("--text-encoder", default=None, metavar="PATH",
                        help="(with --ckpt) SANA's Gemma-2: a transformers folder (config.json, model*.safetensors, "
                             "tokenizer.json) or a diffusers pipeline folder (text_encoder/ + tokenizer/)")
    sample.add_argument("--vae", default=None, metavar="PATH",
                        help="(with --ckpt) SANA's DC-AE: a diffusers AutoencoderDC folder or a pipeline folder (vae/)")
    sample.add_argument("--batch-size", type=count(1), default=None, metavar="N",
                        help="(with --ckpt) prompts per compiled batch, the last one padded; rounded up to a multiple "
                             "of the device count (default: 256 with the checkpoint's own text encoder, else one per "
                             "device)")
    sample.add_argument("--out", required=True,
                        help="with --ckpt: a .png file for one prompt, else a directory; with --config: a directory")
    sample.add_argument("--force", action="store_true", help="replace an existing output")

    train = commands.add_parser(
        "train", help="distil the config's teacher into its student (SANA-Sprint sCM + LADD)",
        description="Run the distillation in a run directory (config.json, checkpoints/, tensorboard/, samples/). "
                    "Every process of a multi-host job runs the same command; the job is joined from "
                    "S2FLASH_COORDINATOR/S2FLASH_NUM_PROCESSES/S2FLASH_PROCESS_ID or the cluster environment.")
    _add_config_args(train)
    train.add_argument("--out", required=True, help="run directory (a local path or gs:// / s3:// URI)")
    train.add_argument("--mesh", default="", metavar="data=..,fsdp=..,tensor=..",
                       help="mesh axis sizes (one may be -1), as mesh.* overrides; unset axes keep the config's")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint that restores (step 0 if none)")
    train.add_argument("--force", action="store_true", help="delete an existing run directory and start over")
    train.add_argument("--fork", default=None, metavar="RUN_DIR",
                       help="start a new run from RUN_DIR's newest checkpoint (every network and optimizer state), "
                            "keeping its step: train.steps stays the global total and must be above it; the config "
                            "may differ only in resumable keys, sd35_flash.step_range and seed. For the branches of "
                            "split-timestep fine-tuning, see docs/sd35_flash.md")
    train.add_argument("--stop-after", type=count(1), default=None, metavar="N",
                       help="end this invocation after N updates with a checkpoint (a preemption drill)")
    train.add_argument("--export", default=None, metavar="CKPT",
                       help="when the run is complete, write its product (EMA if kept) as a model checkpoint here, "
                            "e.g. a trained teacher for another run's train.teacher_checkpoint")
    train.add_argument("--teacher", default=None, metavar="CKPT",
                       help="model checkpoint of the teacher to distil from (sets train.teacher_checkpoint)")
    train.add_argument("--student-init", default=None, metavar="CKPT",
                       help="model checkpoint the trained network starts from (sets train.init_checkpoint; default: "
                            "a copy of the teacher with a zero guidance embedder output layer, so the student "
                            "equals the teacher at step 0)")

    prepare = commands.add_parser(
        "prepare-teacher", help="turn a SANA flow checkpoint into a SANA-Sprint teacher (QK-norm, dense time embedding)",
        description="Insert QK RMSNorm into every attention of a flow-model checkpoint that lacks it, switch its time "
                    "embedding to the dense convention (fed s instead of 1000·s), and fine-tune it with flow matching "
                    "on the config's data: the time embedding and new norms first (prepare_teacher.embedding_steps), "
                    "then all layers with a learning-rate warm-up (prepare_teacher.full_steps / full_warmup_steps). "
                    "Reports how far the prepared teacher's velocity is from the original's before and after. "
                    "Rerunning resumes. See docs/teacher.md.")
    _add_config_args(prepare)
    prepare.add_argument("--from", dest="source", required=True, metavar="CKPT",
                         help="model checkpoint of the flow model (e.g. from `s2flash convert import`)")
    prepare.add_argument("--out", required=True, metavar="CKPT", help="where the prepared teacher checkpoint goes")
    prepare.add_argument("--work", default=None, metavar="DIR",
                         help="working directory of the stages (default: OUT-work); rerunning resumes from it")
    prepare.add_argument("--force", action="store_true", help="replace --out and start the work over")

    plan = commands.add_parser(
        "plan", help="per-device memory of the training step on a mesh, without the accelerators",
        description="Compile the full training step ahead of time on N fake CPU devices laid out as --mesh and "
                    "print per-device memory (parameters, EMA, frozen teacher, optimizer state, step "
                    "temporaries) against the capacity of --device-kind. Run it in a fresh process.")
    _add_config_args(plan)
    plan.add_argument("--mesh", default="", metavar="data=..,fsdp=..,tensor=..",
                      help="mesh axis sizes (one may be -1); unset axes keep the config's")
    plan.add_argument("--device-kind", required=True, choices=sorted(DEVICE_MEMORY))
    plan.add_argument("--devices", type=count(1, MAX_PLAN_DEVICES), required=True,
                      help=f"number of devices of the target slice (at most {MAX_PLAN_DEVICES}, simulated on CPU)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object (bytes per device)")

    demo = commands.add_parser(
        "demo", help="the built-in shapes demo: train a teacher, distil a 1-4 step student, evaluate (CPU)",
        description="Train a tiny SANA teacher with flow matching on procedural 32x32 shape images, transform it "
                    "to TrigFlow and distil a SANA-Sprint student (sCM + LADD), then sample held-out prompts with "
                    "the teacher (20 steps; 1, 2, 4 for comparison) and the student (1, 2, 4 steps) and score them: grid.png, metrics.md, "
                    "metrics.json, TensorBoard logs. About 10 minutes on 2 CPU cores (estimated from its stages); resumes "
                    "when rerun.")
    demo.add_argument("--out", default="runs/shapes-demo", help="demo directory (default: runs/shapes-demo)")
    demo.add_argument("--quick", action="store_true", help="a short run (a few minutes, mostly compilation) for tests and a first look")
    demo.add_argument("--force", action="store_true", help="delete an existing demo directory and start over")
    demo.add_argument("--unsaid-positions", action="store_true",
                      help="prompts that leave cells unsaid ('a big red circle'): a quarter of the training "
                           "objects' and every held-out one-object prompt's, so a sample must choose a cell "
                           "that its caption does not, and the student's 1-step start (the teacher's posterior "
                           "mean) is a haze over the cells")
    summaries = {e.demo.name: e.summary for e in recipe_entries().values() if e.demo is not None}
    demo.add_argument("--recipe", default="sana-sprint", metavar="NAMES",
                      help="distillation recipe(s), comma-separated, one set of rows each: " + "; ".join(
                          f"{name} ({summaries[name]}; rows at {', '.join(map(str, demo.steps))} steps"
                          f"{', captions only' if demo.prompts_only else ''})"
                          for name, demo in demo_entries().items()) + "; default sana-sprint")

    precompute = commands.add_parser(
        "precompute", help="encode an image folder with captions into training shards (DC-AE + text encoder)",
        description="Encode images with SANA's DC-AE (diffusers' AutoencoderDC) and captions with a text encoder "
                    "(Gemma-2 as in SANA) into ArrayRecord shards that `s2flash train` reads (data.path). "
                    "--backend torch (default) runs diffusers/transformers and needs the [torch] extra; --backend jax "
                    "runs the JAX ports on the same folders without torch. Resumable with --resume.")
    add_precompute_arguments(precompute)

    evaluate = commands.add_parser(
        "eval", help="generate a prompt set at several step counts and score it: FID, patch FID, CLIP score",
        description="Generate MJHQ-30K / GenEval / a prompt file's prompts with a model checkpoint at each --steps "
                    "count, score them in JAX (FID and patch FID with pytorch-fid's InceptionV3 against --ref-stats "
                    "or --ref-images; CLIP score with a transformers CLIP folder) and write metrics.md and "
                    "metrics.json; --export also writes the images in the layout the official GenEval / MJHQ "
                    "evaluators read. Every file is local: see docs/evaluation.md.")
    add_eval_arguments(evaluate)
    _add_export_parser(commands)
    _add_convert_parser(commands)
    _add_quantize_parser(commands)
    _add_merge_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="a training run's product -> model checkpoint and/or diffusers folder, on one host",
        description="Restore the product of a run directory (the student, or a flow-matching run's model; its EMA "
                    "when the run keeps one) from its newest checkpoint (or --step) onto this host's devices and write "
                    "it as a model checkpoint (--model) and/or a diffusers transformer or pipeline folder "
                    "(--diffusers, as `s2flash convert export` writes). Works on runs trained by any number of "
                    "processes: only the product's weights are read. Runs in one process.")
    export.add_argument("run_dir", help="the run directory (`s2flash train --out`)")
    export.add_argument("--model", default=None, metavar="CKPT", help="model checkpoint directory to write")
    export.add_argument("--diffusers", default=None, metavar="DIR", help="diffusers folder to write")
    export.add_argument("--step", type=count(0), default=None, help="the checkpoint step to export (default: the newest)")
    export.add_argument("--components-from", default=None, metavar="CKPT",
                        help="model checkpoint whose text encoder / autoencoder the export carries (default: the "
                             "run's train.teacher_checkpoint, when it has them)")
    export.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="(--diffusers) weight dtype (default: as trained)")
    export.add_argument("--pipeline", default=None, metavar="TEACHER_PIPELINE_DIR",
                        help="(--diffusers) write a whole diffusers pipeline with this pipeline's VAE, text encoder "
                             "and tokenizer, as `s2flash convert export --pipeline`")
    export.add_argument("--force", action="store_true", help="replace existing outputs")


def _run_export(args: argparse.Namespace) -> int:
    from s2flash_jax.train.export import export_run

    result = export_run(args.run_dir, model=args.model, diffusers=args.diffusers, step=args.step,
                        components_from=args.components_from, dtype=args.dtype, pipeline=args.pipeline,
                        force=args.force)
    written = " and ".join(str(p) for p in (result.model, result.diffusers) if p is not None)
    print(f"exported the {result.product} ({'EMA' if result.ema else 'trained'} weights) of {args.run_dir} at step "
          f"{result.step} to {written}")
    return 0


def _add_quantize_parser(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="weight-only int8 / int4 quantization of a model checkpoint (qwix), some layers kept",
        description="Quantize the kernels of a model checkpoint's linear layers to int8 or int4 (qwix post-training "
                    "quantization, weight-only, per output channel), except the layers --keep names, and write a "
                    "quantized model checkpoint (its components copied) that `s2flash sample --ckpt` and `s2flash "
                    "eval` run with quantized matmuls and `s2flash convert export` exports dequantized. See "
                    "docs/quantization.md.")
    quantize.add_argument("ckpt", help="model checkpoint directory (e.g. runs/shapes-demo/student/model)")
    quantize.add_argument("--bits", type=int, required=True, help="8 (int8) or 4 (int4)")
    quantize.add_argument("--keep", nargs="*", default=None, metavar="PATTERN",
                          help="layers to keep in full precision: globs over layer names such as "
                               "transformer_blocks/attn1/to_q or 'time_embed/*' (or re:REGEX); each must match a "
                               "layer. Default: the backbone's first and last layers (SANA: patch_embed/* and proj_out); "
                               "--keep with no pattern quantizes every layer")
    quantize.add_argument("--out", required=True, help="quantized model checkpoint directory to write")
    quantize.add_argument("--force", action="store_true", help="replace an existing output")


def _run_quantize(args: argparse.Namespace) -> int:
    from s2flash_jax.quantize import quantize_checkpoint

    result = quantize_checkpoint(args.ckpt, args.out, bits=args.bits, keep=args.keep, force=args.force)
    q = result.quantization
    print(f"quantized {len(q.layers)} linear layers of {args.ckpt} to int{q.bits} (kept: "
          f"{', '.join(q.keep) or 'none'}); parameters {result.bytes_before:,} -> {result.bytes_after:,} bytes; "
          f"wrote {args.out}")
    return 0


def _add_merge_parser(commands) -> None:
    merge = commands.add_parser(
        "merge", help="interpolate the weights of model checkpoints of one architecture into one",
        description="Write a model checkpoint whose every parameter is the weighted sum of the checkpoints' "
                    "(float32 sum, stored in their dtype): how the branches of split-timestep fine-tuning "
                    "(`s2flash train --fork`) are merged back into one model. The checkpoints must be float (not "
                    "quantized) and of one architecture; the output carries the first one's components. See "
                    "docs/sd35_flash.md.")
    merge.add_argument("ckpts", nargs="+", metavar="CKPT", help="model checkpoint directories to merge")
    merge.add_argument("--weights", nargs="+", type=real(), default=None, metavar="W",
                       help="one non-negative weight per checkpoint, summing to 1 (default: equal weights)")
    merge.add_argument("--out", required=True, metavar="CKPT", help="merged model checkpoint directory to write")
    merge.add_argument("--force", action="store_true", help="replace an existing output")


def _run_merge(args: argparse.Namespace) -> int:
    from s2flash_jax.merge import merge_checkpoints

    result = merge_checkpoints(args.ckpts, args.out, weights=args.weights, force=args.force)
    sources = ", ".join(f"{path} x {weight:.6g}" for path, weight in zip(result.sources, result.weights))
    print(f"merged {len(result.sources)} checkpoints ({sources}), {result.parameters:,} parameters each; "
          f"wrote {args.out}")
    return 0


# Modules of the [torch] extra: a convert command that needs one of them says so instead of a traceback.
TORCH_EXTRA = ("torch", "diffusers", "safetensors", "transformers")


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser(
        "convert", help="move checkpoints between PyTorch (diffusers, original SANA) and s2flash",
        description="Import a diffusers SanaTransformer2DModel folder or an original NVlabs SANA / SANA-Sprint "
                    "checkpoint as an s2flash model checkpoint, export one as a diffusers transformer (or a whole "
                    "SanaSprintPipeline for a student, SanaPipeline for a teacher), or inspect any of them. Tensors "
                    "stream one at a time; outputs appear only when complete. Needs the [torch] extra for .pth files "
                    "and --pipeline.")
    actions = convert.add_subparsers(dest="convert_command", required=True)
    imp = actions.add_parser("import", help="diffusers / original SANA checkpoint -> s2flash model checkpoint")
    imp.add_argument("--format", required=True, choices=("diffusers", "sana"),
                     help="diffusers: a SanaTransformer2DModel folder (config.json + safetensors, or a pipeline "
                          "folder); sana: an original NVlabs .pth / .safetensors")
    imp.add_argument("src", help="the checkpoint to import")
    imp.add_argument("--out", required=True, help="model checkpoint directory to write")
    imp.add_argument("--config", default=None,
                     help="(--format sana) the architecture: a preset (sana-sprint-0.6b, sana-sprint-1.6b, "
                          "sana-sprint-0.6b-teacher, sana-sprint-1.6b-teacher, sana-0.6b-1024px, sana-1.6b-1024px) "
                          "or a diffusers-style config.json; default: the one student preset the shapes fit")
    imp.add_argument("--force", action="store_true", help="replace an existing output")

    exp = actions.add_parser("export", help="s2flash model checkpoint -> diffusers transformer, SanaPipeline or SanaSprintPipeline")
    exp.add_argument("ckpt", help="model checkpoint directory")
    exp.add_argument("--out", required=True, help="diffusers folder to write")
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="weight dtype (default: as stored in the checkpoint)")
    exp.add_argument("--pipeline", default=None, metavar="TEACHER_PIPELINE_DIR",
                     help="write a whole diffusers pipeline, taking the VAE, text encoder and tokenizer from this "
                          "pipeline folder (e.g. the teacher's SanaPipeline): a SanaSprintPipeline for a SANA-Sprint "
                          "student (guidance_embeds), a SanaPipeline for a flow model (its FlowMatchEulerDiscrete"
                          "Scheduler shifted by the checkpoint's sampling.flow_shift, else 1.0)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    exp.add_argument("--force", action="store_true", help="replace an existing output")

    lora = actions.add_parser(
        "export-lora", help="the LoRA adapters of an s2flash model checkpoint alone -> diffusers LoRA file",
        description="Write a checkpoint's LoRA adapters (model.lora_rank > 0) as DIR/pytorch_lora_weights.safetensors, "
                    "which a diffusers SanaPipeline's or SanaSprintPipeline's load_lora_weights(DIR) loads onto a "
                    "transformer holding the base weights. `convert export` "
                    "of the same checkpoint writes the whole model with the adapters merged.")
    lora.add_argument("ckpt", help="model checkpoint directory with LoRA adapters")
    lora.add_argument("--out", required=True, help="folder to write pytorch_lora_weights.safetensors into")
    lora.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                      help="adapter dtype (default: as stored in the checkpoint)")
    lora.add_argument("--force", action="store_true", help="replace an existing output")

    insp = actions.add_parser("inspect", help="print a checkpoint's format, config, parameter count, dtypes and "
                                              "the keys the converter would not understand")
    insp.add_argument("src", help="diffusers folder, original SANA .pth/.safetensors, or s2flash model checkpoint")
    insp.add_argument("--format", choices=("diffusers", "sana"), default=None, help="expected format (default: detect)")
    insp.add_argument("--config", default=None, help="(original SANA) a preset or config.json, as for import")


def _run_convert(args: argparse.Namespace) -> int:
    # conversion/ is imported here only: it is the one package that may need torch and diffusers.
    try:
        from conversion.cli import run_convert

        return run_convert(args)
    except ModuleNotFoundError as e:
        if e.name not in TORCH_EXTRA:
            raise
        raise ConfigError(f"convert {args.convert_command} needs the [torch] extra (module {e.name!r} is not "
                          f"installed): pip install 's2flash-jax[torch]'") from e


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = resolve(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {str(path)!r} does not exist")
        from_file = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not from_file:
            raise ConfigError(f"--prompts-file {str(path)!r} holds no prompts (expected one per line)")
        prompts += from_file
    if not prompts:
        raise ConfigError("sample --ckpt needs at least one --prompt or a --prompts-file")
    return prompts


def _sana_components(args: argparse.Namespace) -> tuple[dict, dict]:
    """(components, sources): --text-encoder and --vae loaded by conversion/'s readers (imported here only;
    they read safetensors and tokenizer.json themselves, so no torch), and the paths they came from."""
    for flag, path in (("--text-encoder", args.text_encoder), ("--vae", args.vae)):
        if path is not None and not resolve(path).exists():
            raise ConfigError(f"{flag} {path!r} does not exist")
    from s2flash_jax.model_checkpoint import read_metadata
    from s2flash_jax.precision import FP32

    read_metadata(args.ckpt)  # a bad checkpoint fails before gigabytes of encoders load
    components, sources = {}, {}
    if args.text_encoder is not None:
        from conversion.gemma2 import load_caption_encoder

        # Prompts lowercased and stripped as diffusers' SanaSprintPipeline encodes them when sampling.
        components["text_encoder"] = load_caption_encoder(args.text_encoder, precision=FP32, lowercase=True)
        sources["text_encoder"] = str(args.text_encoder)
    if args.vae is not None:
        from conversion.dc_ae import load_dc_ae

        components["autoencoder"] = load_dc_ae(args.vae, precision=FP32)
        sources["vae"] = str(args.vae)
    return components, sources


def _run_eval(args: argparse.Namespace) -> int:
    # conversion/'s readers load the scoring networks: they read safetensors / .npz without torch
    # (only pytorch-fid's original .pth goes through torch).
    from conversion.clip import load_clip_scorer
    from conversion.inception import load_inception
    from s2flash_jax.eval.run import ScoringModels, run_eval_command

    components, sources = _sana_components(args) if args.ckpt else ({}, {})
    return run_eval_command(args, ScoringModels(load_inception, load_clip_scorer), sources=sources, **components)


def mesh_overrides(spec: str) -> list[str]:
    """"data=2,fsdp=4" -> ["mesh.data=2", "mesh.fsdp=4"]."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    bad = [item for item in items if item.partition("=")[0] not in ("data", "fsdp", "tensor") or "=" not in item]
    if bad:
        raise ConfigError(f"--mesh {spec!r}: expected comma-separated data=N, fsdp=N, tensor=N; got {bad}")
    return [f"mesh.{item}" for item in items]


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (data, run directory, mesh): one line, exit code 2."""
    from s2flash_jax.data.records import DataError
    from s2flash_jax.model_checkpoint import CheckpointError
    from s2flash_jax.pipeline import PromptError
    from s2flash_jax.parallel.mesh import MeshError
    from s2flash_jax.train.loop import RunError

    return DataError, MeshError, RunError, CheckpointError, PromptError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "precompute":
        return run_precompute(args)
    try:
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "quantize":
            return _run_quantize(args)
        if args.command == "merge":
            return _run_merge(args)
        if args.command == "export":
            return _run_export(args)
        if args.command == "demo":
            from s2flash_jax.demo import run_shapes_demo

            run_shapes_demo(args.out, quick=args.quick, force=args.force,
                            recipes=tuple(r.strip() for r in args.recipe.split(",") if r.strip()),
                            unsaid_positions=args.unsaid_positions)
            return 0
        if args.command == "sample" and args.ckpt:
            from s2flash_jax.pipeline import run_sample_checkpoint

            if args.config or args.overrides:
                raise ConfigError("sample: give either --ckpt (a trained model) or --config (a random model), not both")
            prompts = _prompts(args)
            components, sources = _sana_components(args)
            run_sample_checkpoint(args.ckpt, prompts, out=args.out, steps=args.steps, seed=args.seed,
                                  guidance_scale=args.guidance_scale, force=args.force, batch_size=args.batch_size,
                                  sources=sources, **components)
            return 0
        if args.command == "sample" and (args.text_encoder or args.vae or args.batch_size):
            raise ConfigError("sample: --text-encoder, --vae and --batch-size go with --ckpt")
        if args.config is None:
            raise ConfigError(f"{args.command}: --config (or, for sample, --ckpt) is required")
        if args.command == "plan":
            # Must happen before JAX starts a backend: the plan runs on fake CPU devices only.
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.devices)
            args.overrides = [*args.overrides, *mesh_overrides(args.mesh)]
        if args.command == "train":
            args.overrides = [*args.overrides, *([f"train.teacher_checkpoint={args.teacher}"] if args.teacher else []),
                              *([f"train.init_checkpoint={args.student_init}"] if args.student_init else []),
                              *mesh_overrides(args.mesh)]
        config = load_config(args.config, args.overrides)
        if args.command == "sample":
            from s2flash_jax.random_sample import run_sample

            run_sample(config, args.out, force=args.force)
        elif args.command == "train":
            from s2flash_jax.outputs import refuse_existing_output
            from s2flash_jax.parallel.distributed import describe, initialize
            from s2flash_jax.train.loop import train

            how = initialize()
            if jax.process_index() == 0:
                print(f"s2flash train: {describe(how)}", flush=True)
            if args.export and jax.process_count() > 1:
                raise ConfigError("--export runs in one process; export a multi-host run afterwards with "
                                  "`s2flash export RUN_DIR` on one host")
            if args.export:
                refuse_existing_output(args.export, force=args.force)
            result = train(config, args.out, resume=args.resume, force=args.force, stop_after=args.stop_after,
                           fork_from=args.fork)
            if args.export and result.step == config.train.steps:
                print(f"exported the {result.product} to {result.export(config, args.export, force=args.force)}")
        elif args.command == "prepare-teacher":
            from s2flash_jax.prepare_teacher import run_prepare_teacher

            run_prepare_teacher(config, args.source, args.out, work=args.work, force=args.force)
        elif args.command == "plan":
            from s2flash_jax.train.plan import plan_memory

            plan = plan_memory(config, args.device_kind, log=None if args.json else print)
            if args.json:
                print(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}))
                return 0
            print(f"{args.config} on {args.devices} x {args.device_kind}, mesh {plan.mesh}, "
                  f"global batch {config.train.batch_size}:")
            print(plan.table())
    except (ConfigError, OutputExists, StorageError, *_input_errors()) as e:
        print(f"s2flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
