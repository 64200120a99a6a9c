"""`s2flash` command line: thin subcommands over the library.

Every subcommand takes `--config PATH[:ARG]` and trailing `key.sub=value` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from s2flash_jax.config import ConfigError, load_config
from s2flash_jax.data.precompute import add_precompute_arguments, run_precompute
from s2flash_jax.outputs import OutputExists
from s2flash_jax.train.metrics import DEVICE_MEMORY


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally with a variant: configs/tiny.py[:ARG]")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.num_layers=2 sample.steps=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2flash", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser(
        "sample", help="sample latents with a few-step flow sampler and write a preview",
        description="Sample latents from a SANA transformer (randomly initialised from the config until "
                    "checkpoints land) and write latents.npy, preview.png and config.json to --out.")
    _add_config_args(sample)
    sample.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    sample.add_argument("--force", action="store_true", help="replace an existing output directory")

    train = commands.add_parser(
        "train", help="distil the config's teacher into its student (SANA-Sprint sCM + LADD)",
        description="Run the distillation in a run directory (config.json, checkpoints/, tensorboard/, samples/). "
                    "Every process of a multi-host job runs the same command; the job is joined from "
                    "S2FLASH_COORDINATOR/S2FLASH_NUM_PROCESSES/S2FLASH_PROCESS_ID or the cluster environment.")
    _add_config_args(train)
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint that restores (step 0 if none)")
    train.add_argument("--force", action="store_true", help="delete an existing run directory and start over")
    train.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="end this invocation after N updates with a checkpoint (a preemption drill)")

    plan = commands.add_parser(
        "plan", help="per-device memory of the training step on a mesh, without the accelerators",
        description="Compile the full training step ahead of time on N fake CPU devices laid out as --mesh and "
                    "print per-device memory (parameters, EMA, frozen teacher, optimizer state, step "
                    "temporaries) against the capacity of --device-kind. Run it in a fresh process.")
    _add_config_args(plan)
    plan.add_argument("--mesh", default="", metavar="data=..,fsdp=..,tensor=..",
                      help="mesh axis sizes (one may be -1); unset axes keep the config's")
    plan.add_argument("--device-kind", required=True, choices=sorted(DEVICE_MEMORY))
    plan.add_argument("--devices", type=int, required=True, help="number of devices of the target slice")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object (bytes per device)")

    precompute = commands.add_parser(
        "precompute", help="encode an image folder with captions into training shards (DC-AE + text encoder)",
        description="Encode images with diffusers' AutoencoderDC and captions with a transformers text encoder "
                    "(Gemma-2 as in SANA) into ArrayRecord shards that `s2flash train` reads (data.path). "
                    "Needs the [torch] extra; resumable with --resume.")
    add_precompute_arguments(precompute)
    return parser


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
    from s2flash_jax.parallel.mesh import MeshError
    from s2flash_jax.train.loop import RunError

    return DataError, MeshError, RunError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "precompute":
        return run_precompute(args)
    try:
        if args.command == "plan":
            if args.devices < 1:
                raise ConfigError(f"--devices {args.devices} must be >= 1")
            # Must happen before JAX starts a backend: the plan runs on fake CPU devices only.
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.devices)
            args.overrides = [*args.overrides, *mesh_overrides(args.mesh)]
        config = load_config(args.config, args.overrides)
        if args.command == "sample":
            from s2flash_jax.sampling import run_sample

            run_sample(config, args.out, force=args.force)
        elif args.command == "train":
            from s2flash_jax.parallel.distributed import initialize
            from s2flash_jax.train.loop import train

            initialize()
            train(config, args.out, resume=args.resume, force=args.force, stop_after=args.stop_after)
        elif args.command == "plan":
            from s2flash_jax.train.plan import plan_memory

            plan = plan_memory(config, args.device_kind, log=None if args.json else print)
            if args.json:
                print(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}))
                return 0
            print(f"{args.config} on {args.devices} x {args.device_kind}, mesh {plan.mesh}, "
                  f"global batch {config.train.batch_size}:")
            print(plan.table())
    except (ConfigError, OutputExists, *_input_errors()) as e:
        print(f"s2flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
