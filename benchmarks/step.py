"""Examples/s of the tiny SANA-Sprint training step on several fake CPU device counts (default 1 and 8).

    python benchmarks/step.py [--steps 40] [--batch-size 16] [--devices 1 8] [--json OUT]

Each device count runs in its own process (the fake device count is fixed when JAX starts): the
full `s2flash train` loop (data pipeline, generator and discriminator phases, metrics) on a tiny
random dataset, timed over the second half of the run so compilation and warm-up are excluded.
Fake devices share the same CPU cores, so this checks that sharding works and costs little; it is
not a speed-up claim. The ratio is examples/s against the 1-device run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(devices: int, steps: int, batch_size: int) -> None:
    sys.path.insert(0, str(REPO))
    from s2flash_jax.config import load_config
    from s2flash_jax.train.loop import train
    from tests.tiny_data import write_tiny_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_dataset(Path(tmp) / "data", num_records=256)
        config = load_config(str(REPO / "configs/tiny.py"), [
            f"data.path={data}", f"train.steps={steps}", f"train.batch_size={batch_size}",
            f"train.log_every={steps // 2}", "train.checkpoint_every=0", "mesh.data=-1"])
        result = train(config, Path(tmp) / "run", quiet=True)
    timed = result.history[-1]
    print("RESULT " + json.dumps({"devices": devices, "examples_per_s": timed["perf/examples_per_s"],
                                  "step_time_s": timed["perf/step_time_s"]}), flush=True)


def measure(device_counts: list[int], steps: int, batch_size: int) -> list[dict]:
    """One row per device count: {devices, examples_per_s, step_time_s, vs_1_device} (examples/s
    over the first row's); each count runs in its own process."""
    rows = []
    for devices in device_counts:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, __file__, "--child", str(devices), "--steps", str(steps),
                              "--batch-size", str(batch_size)], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{devices}-device run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    for row in rows:
        row["vs_1_device"] = row["examples_per_s"] / rows[0]["examples_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", default=None, help="also write the rows and settings here as JSON")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.steps, args.batch_size)
    rows = measure(args.devices, args.steps, args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": "configs/tiny.py", "batch": args.batch_size,
                                               "steps": args.steps, "cpu_cores": os.cpu_count(), "rows": rows},
                                              indent=2) + "\n")
    print(f"tiny config, global batch {args.batch_size}, {os.cpu_count()} CPU cores\n")
    print("| fake devices | step_ms | examples/s | vs 1 device |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['devices']} | {row['step_time_s'] * 1e3:.0f} | {row['examples_per_s']:.1f} | "
              f"{row['vs_1_device']:.2f} |")


if __name__ == "__main__":
    main()
