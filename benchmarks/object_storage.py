"""Checkpoint save and restore time in a bucket against local disk, on the GCS emulator.

Starts tests/fake_gcs.py's emulator on 127.0.0.1, then in a fresh process (the clients read their
settings when they start) saves and restores a run checkpoint (train/checkpoint.py's RunCheckpoints,
so orbax as a run uses it) of `--megabytes` of float32 arrays to a temporary local directory and to
gs://, and prints the seconds of each and the bucket / local ratio. These are emulator figures: a
single-threaded Python server on this machine, not Cloud Storage, whose throughput and latency
differ; they say what the object-store path costs in requests and copies, not what a pod will see.

  python benchmarks/object_storage.py [--megabytes 64] [--arrays 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(megabytes: int, arrays: int, repeats: int) -> dict:
    """In the process the emulator's variables were set for: median save / restore seconds."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from s2flash_jax.storage import resolve
    from s2flash_jax.train.checkpoint import RunCheckpoints
    from tests.fake_gcs import BUCKET

    size = megabytes * 2**20 // 4 // arrays
    rng = np.random.default_rng(0)
    state = {f"w{i}": jax.numpy.asarray(rng.standard_normal(size, dtype=np.float32)) for i in range(arrays)}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    result = {}
    with tempfile.TemporaryDirectory() as local:
        for where, root in (("local", resolve(local)), ("bucket", resolve(f"gs://{BUCKET}/benchmark"))):
            saves, restores = [], []
            for step in range(repeats):
                checkpoints = RunCheckpoints(root / "checkpoints", keep=repeats, asynchronous=False)
                start = time.perf_counter()
                checkpoints.save(step, state, {"step": step})
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                restored = checkpoints.restore_newest(target)
                jax.block_until_ready(restored.state)
                restores.append(time.perf_counter() - start)
                assert restored.step == step
                checkpoints.close()
            result[where] = {"save_s": float(np.median(saves)), "restore_s": float(np.median(restores))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--arrays", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.megabytes, args.arrays, args.repeats)), flush=True)
        return

    sys.path.insert(0, str(REPO))
    from tests.fake_gcs import fake_gcs

    with fake_gcs() as env:
        child = subprocess.run([sys.executable, __file__, "--measure", *sys.argv[1:]], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=1800)
    if child.returncode != 0:
        sys.exit(child.stdout[-2000:] + child.stderr[-4000:])
    result = json.loads([line for line in child.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    print(f"run checkpoint of {args.megabytes} MB in {args.arrays} float32 arrays, median of {args.repeats} "
          "(GCS emulator on 127.0.0.1, not Cloud Storage):")
    print("| | local disk | bucket (emulator) | bucket / local |")
    print("|---|---|---|---|")
    for key, label in (("save_s", "save"), ("restore_s", "restore")):
        local, bucket = result["local"][key], result["bucket"][key]
        print(f"| {label} | {local:.2f} s | {bucket:.2f} s | {bucket / local:.1f} |")


if __name__ == "__main__":
    main()
