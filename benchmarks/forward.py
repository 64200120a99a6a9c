"""JAX jitted forward vs diffusers forward of the same SANA transformer, same weights and batch.

Default: the SANA-Sprint 0.6B block shape (width 1152, 36 linear heads, 16x72 cross heads, Mix-FFN
2.5x) with fewer layers, 32x32 latents (1024 px), a 300-token caption, float32 on the CPU.
Prints one `jax_ms torch_ms ratio` line (ratio = jax / torch; below 1 means JAX is faster) after
checking both give the same output.

  python benchmarks/forward.py [--layers 4] [--batch 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import SanaTransformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import timed  # noqa: E402
from conversion.sana_diffusers import sana_from_diffusers  # noqa: E402
from s2flash_jax.config import load_config  # noqa: E402
from s2flash_jax.precision import FP32  # noqa: E402


def step_rows(jax_runs: dict, torch_runs: dict, repeats: int) -> list[dict]:
    """{steps: call} of each side (torch_runs empty where there is no reference) -> one row per step
    count with the median ms of each and their ratio; JAX then torch for each row, so both see the
    same background load."""
    rows = []
    for n, jax_run in jax_runs.items():
        row = {"steps": n, "jax_ms": timed(jax_run, repeats)}
        if n in torch_runs:
            row["torch_ms"] = timed(torch_runs[n], repeats)
            row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sana_sprint.py:0.6b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--caption-length", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = dataclasses.replace(load_config(args.config).model, num_layers=args.layers)
    torch.manual_seed(0)
    reference = SanaTransformer2DModel(**config.to_diffusers()).eval()
    model = sana_from_diffusers(reference.config, reference.state_dict(), precision=FP32)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, config.in_channels, args.size, args.size)).astype(np.float32)
    caption = rng.standard_normal((args.batch, args.caption_length, config.caption_channels)).astype(np.float32)
    mask = np.ones((args.batch, args.caption_length), np.int64)
    mask[:, args.caption_length // 2:] = 0
    t = np.full((args.batch,), 0.5, np.float32)
    g = np.full((args.batch,), 0.45, np.float32) if config.guidance_embeds else None

    def torch_forward():
        with torch.no_grad():
            return reference(torch.from_numpy(x), torch.from_numpy(caption), torch.from_numpy(t),
                             guidance=None if g is None else torch.from_numpy(g),
                             encoder_attention_mask=torch.from_numpy(mask)).sample

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    jax_args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask),
                None if g is None else jnp.asarray(g))

    def jax_forward():
        return jax.block_until_ready(forward(state, *jax_args))

    start = time.perf_counter()
    got = np.asarray(jax_forward()).transpose(0, 3, 1, 2)
    compile_s = time.perf_counter() - start
    expected = torch_forward().numpy()
    error = np.abs(got - expected).max() / np.abs(expected).max()
    if error > 1e-4:
        raise SystemExit(f"outputs differ: max relative error {error:.2e}")

    jax_ms, torch_ms = timed(jax_forward, args.repeats), timed(torch_forward, args.repeats)
    print(f"# {args.config} width {config.inner_dim}, {args.layers} layers, batch {args.batch}, "
          f"{args.size}x{args.size} latents, caption {args.caption_length}, float32, "
          f"{jax.devices()[0].platform} / torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"jax compile {compile_s:.1f}s, max rel. diff {error:.1e}")
    print("jax_ms torch_ms ratio")
    print(f"{jax_ms:.1f} {torch_ms:.1f} {jax_ms / torch_ms:.2f}")


if __name__ == "__main__":
    main()
