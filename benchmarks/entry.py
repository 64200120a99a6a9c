"""The command line every side-by-side benchmark module shares: shapes preset, repeats, JSON out."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax

from benchmarks.shapes import PRESETS, Shapes, choose


def benchmark_main(run: Callable[[Shapes, int], dict], description: str, argv: list[str] | None = None) -> None:
    """Parse --shapes/--repeats/--json, call run(shapes, repeats) and write or print its result as
    JSON, with the device it ran on added."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shapes", default="auto", choices=["auto", *PRESETS],
                        help="auto: cpu on a CPU backend, accelerator on GPU/TPU (benchmarks/shapes.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--json", default=None, help="write the result here as JSON (default: print it)")
    args = parser.parse_args(argv)
    result = run(choose(args.shapes), args.repeats)
    device = jax.devices()[0]
    result["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
