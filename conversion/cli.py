"""`s2flash convert {import,export,export-lora,inspect}`: the handlers behind the subcommands
s2flash_jax/cli.py defines.

Bad input raises ConversionError (a CheckpointError): the CLI prints it as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import re

from conversion.errors import ConversionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 bytes (also KB, MB, KiB, MiB, GiB, or a plain byte count)."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: expected a positive size such as 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _import(args: argparse.Namespace) -> None:
    from conversion.importer import import_checkpoint

    result = import_checkpoint(args.src, args.format, args.out, config=args.config, force=args.force)
    dtypes = ", ".join(f"{n:,} {dtype}" for dtype, n in sorted(result.dtypes.items()))
    c = result.config
    print(f"imported {result.parameters:,} parameters ({dtypes}) from {args.src} ({result.source_format}) into {args.out}")
    print(f"model: {c.num_layers} blocks, width {c.inner_dim}, guidance_embeds={c.guidance_embeds}, "
          f"qk_norm={c.qk_norm}, logvar_head={c.logvar_head}, timestep_scale={c.timestep_scale}")
    for line in result.kept:
        print(f"kept (diffusers drops it): {line}")
    for line in result.ignored:
        print(f"not converted: {line}")


def _export(args: argparse.Namespace) -> None:
    from conversion.exporter import export_checkpoint

    result = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, pipeline=args.pipeline, force=args.force,
                               max_shard_bytes=parse_size(args.max_shard_size))
    what = result.pipeline or "SanaTransformer2DModel"
    shards = [f for f in result.files if f.suffix == ".safetensors"]
    print(f"exported {args.ckpt} as a diffusers {what} to {args.out}: {result.tensors} tensors in {len(shards)} "
          f"safetensors file{'s' if len(shards) > 1 else ''}" + (f", dtype {args.dtype}" if args.dtype else ""))
    if result.config.lora is not None:
        print(f"LoRA adapters (rank {result.config.lora_rank}) merged into {', '.join(result.config.lora_layers)} "
              f"of every block; `s2flash convert export-lora` writes them alone")
    if result.dropped:
        print(f"not exported (diffusers has no place for them): {', '.join(result.dropped)}")


def _export_lora(args: argparse.Namespace) -> None:
    from conversion.lora import export_lora

    result = export_lora(args.ckpt, args.out, dtype=args.dtype, force=args.force)
    c = result.config
    print(f"exported the LoRA adapters of {args.ckpt} (rank {c.lora_rank}, alpha {c.lora.alpha:g}, on "
          f"{', '.join(c.lora_layers)} of {c.num_layers} blocks) to {result.file}: {result.tensors} tensors; load them "
          f"onto the base model with pipeline.load_lora_weights({str(args.out)!r})")


def _inspect(args: argparse.Namespace) -> None:
    from conversion.inspection import inspect_checkpoint

    print(inspect_checkpoint(args.src, args.format, args.config).report())


def run_convert(args: argparse.Namespace) -> int:
    {"import": _import, "export": _export, "export-lora": _export_lora, "inspect": _inspect}[args.convert_command](args)
    return 0
