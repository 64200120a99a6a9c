"""Peak memory and time of `s2flash convert` on a model of SANA-Sprint 1.6B's shapes.

Writes a randomly initialised diffusers SanaTransformer2DModel folder with the preset's shapes
(config.json + 5 GB safetensors shards, generated tensor by tensor: no torch model is built), then
runs, each in a fresh process, `convert import` (diffusers -> s2flash model checkpoint) and
`convert export` (back to diffusers), and prints for each its peak resident memory divided by the
checkpoint's bytes (goal: <= 1.3, i.e. about one copy of the weights plus the interpreter) and its
seconds. `--torch-reference` also measures diffusers' own from_pretrained + save_pretrained of the
same folder. Everything is written under a temporary directory that is deleted at the end.

  python benchmarks/convert_memory.py [--preset sana-sprint-1.6b] [--dtype fp32|bf16] [--layers N]
                                     [--torch-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from conversion.safetensors_io import TensorSpec, write_sharded  # noqa: E402
from conversion.sana_diffusers import expected_torch_shapes  # noqa: E402
from conversion.sana_original import PRESETS  # noqa: E402
from s2flash_jax.models.sana import SanaConfig, SanaTransformer  # noqa: E402

DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
REPO = Path(__file__).resolve().parents[1]


def write_random_diffusers_folder(folder: Path, config: SanaConfig, dtype: np.dtype, seed: int = 0) -> int:
    """A diffusers transformer folder of random weights (N(0, 0.02²)); returns the weights' bytes."""
    model = nnx.eval_shape(lambda: SanaTransformer(config, rngs=nnx.Rngs(0)))
    specs = [(key, TensorSpec(shape, dtype)) for key, shape in expected_torch_shapes(model).items()]
    rng = np.random.default_rng(seed)
    shapes = dict(specs)

    def produce(key: str) -> np.ndarray:
        return (0.02 * rng.standard_normal(shapes[key].shape, dtype=np.float32)).astype(dtype)

    folder.mkdir(parents=True)
    write_sharded(folder, specs, produce, max_shard_bytes=5 * 10**9)
    (folder / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel", **config.to_diffusers()}))
    return sum(spec.nbytes for _, spec in specs)


def measured(argv: list[str]) -> tuple[float, int]:
    """Run a child process; (seconds, its peak resident set size in bytes)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sana-sprint-1.6b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the preset, for a quick run")
    parser.add_argument("--torch-reference", action="store_true",
                        help="also measure diffusers' from_pretrained + save_pretrained of the same folder")
    parser.add_argument("--workdir", default=None, help="where to write (default: a new temporary directory)")
    args = parser.parse_args()

    config = SanaConfig.from_diffusers({**PRESETS[args.preset], **({"num_layers": args.layers} if args.layers else {})})
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        start = time.perf_counter()
        nbytes = write_random_diffusers_folder(work / "diffusers", config, DTYPES[args.dtype])
        print(f"{args.preset} {args.dtype}: {nbytes / 1e9:.2f} GB of weights written in "
              f"{time.perf_counter() - start:.0f} s (random, generated tensor by tensor)", flush=True)
        python = [sys.executable]
        runs = {
            "python + imports only": python + ["-c", "import s2flash_jax.cli, conversion.importer, conversion.exporter"],
            "convert import": python + ["-m", "s2flash_jax.cli", "convert", "import", "--format", "diffusers",
                                        str(work / "diffusers"), "--out", str(work / "ckpt")],
            "convert export": python + ["-m", "s2flash_jax.cli", "convert", "export", str(work / "ckpt"),
                                        "--out", str(work / "exported")],
        }
        if args.torch_reference:
            runs["diffusers load + save (reference)"] = python + ["-c", (
                "import sys; from diffusers import SanaTransformer2DModel; "
                "SanaTransformer2DModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"),
                str(work / "diffusers"), str(work / "torch_saved")]
        print(f"{'step':36s} {'seconds':>8s} {'peak RSS GB':>12s} {'RSS / checkpoint':>17s}")
        for name, argv in runs.items():
            seconds, peak = measured(argv)
            print(f"{name:36s} {seconds:8.1f} {peak / 1e9:12.2f} {peak / nbytes:17.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
