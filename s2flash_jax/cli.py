"""`s2flash` command line: thin subcommands over the library.

Every subcommand takes `--config PATH[:ARG]` and trailing `key.sub=value` overrides.
"""

from __future__ import annotations

import argparse
import sys

from s2flash_jax.config import ConfigError, load_config
from s2flash_jax.outputs import OutputExists


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "sample":
            from s2flash_jax.sampling import run_sample

            run_sample(config, args.out, force=args.force)
    except (ConfigError, OutputExists) as e:
        print(f"s2flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
