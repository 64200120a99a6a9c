"""The depthwise-conv primitive (models/depthwise.py) against autodiff of the same shifted sum, in one
process: forward, forward + both gradients, and the jvp sCM takes through the student.

Default: the shapes demo's Mix-FFN shape, [32, 16, 16, 320] with a 3x3 kernel, float32 on the CPU.
Prints one `primitive_ms autodiff_ms ratio` line per transform (ratio = primitive / autodiff; below 1
means the primitive is faster) after checking that both give the same gradients.

  python benchmarks/depthwise.py [--batch 32] [--size 16] [--channels 320] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import timed  # noqa: E402
from s2flash_jax.models.depthwise import depthwise_conv, shifted_sum  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    x_key, kernel_key = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(x_key, (args.batch, args.size, args.size, args.channels))
    kernel = jax.random.normal(kernel_key, (3, 3, 1, args.channels))

    def transforms(conv):
        loss = lambda x, kernel: (jnp.tanh(conv(x, kernel)) * x).sum()  # noqa: E731
        return {"forward": jax.jit(conv), "forward+grads": jax.jit(jax.grad(loss, (0, 1))),
                "jvp": jax.jit(lambda x, kernel: jax.jvp(lambda x: conv(x, kernel), (x,), (x,)))}

    primitive, autodiff = transforms(depthwise_conv), transforms(shifted_sum)
    for ours, theirs in zip(primitive["forward+grads"](x, kernel), autodiff["forward+grads"](x, kernel)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    print(f"# depthwise {x.shape} 3x3, {jax.devices()[0].platform}; ratio = primitive / autodiff")
    print(f"{'transform':<14} {'primitive_ms':>12} {'autodiff_ms':>12} {'ratio':>6}")
    rows = []
    for name in primitive:
        ours = timed(lambda: jax.block_until_ready(primitive[name](x, kernel)), args.repeats)
        theirs = timed(lambda: jax.block_until_ready(autodiff[name](x, kernel)), args.repeats)
        rows.append({"transform": name, "primitive_ms": ours, "autodiff_ms": theirs, "ratio": ours / theirs})
        print(f"{name:<14} {ours:>12.2f} {theirs:>12.2f} {ours / theirs:>6.2f}")
    return rows


if __name__ == "__main__":
    main()
