"""The side-by-side performance suite: every benchmark, one JSON file and one markdown table.

    python -m benchmarks.suite [--out runs/benchmarks] [--shapes auto|cpu|smoke|accelerator]
                               [--repeats 5] [--only train_step sampling text_to_image scaling]
                               [--scaling-devices 1 2 4 8] [--scaling-steps 40]

- train_step: the JAX sCM + LADD step against the PyTorch reference (benchmarks/train_step.py):
  examples/s, peak memory, FLOPs, MFU where the device's peak is known;
- sampling: 1-, 2-, 4-step latency of the JAX student against SanaSprintPipeline's transformer
  (benchmarks/sampling.py);
- text_to_image: prompt to image end to end (Gemma-2, 1/2/4-step sampling, DC-AE decoding), `s2flash
  sample`'s JAX path against the whole SanaSprintPipeline (benchmarks/text_to_image.py);
- scaling: the tiny training loop on 1, 2, 4, 8 fake CPU devices (benchmarks/step.py): a check
  that sharding works and costs little, not a speed-up claim.

Shapes follow the platform (benchmarks/shapes.py): tiny on a CPU, SANA-Sprint 0.6B at 1024 px on a
GPU or TPU. Each benchmark runs in its own process, since peak-memory counters and fake device
counts are per process; JAX's GPU memory preallocation is turned off so PyTorch can share the GPU,
and PyTorch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless set): spinning, their
default, stalls them when the cores are shared with other work (measured on the 2-core CPU machine
under load: one tiny forward took 516 ms spinning, 11 ms passive).
Writes OUT/suite.json and OUT/suite.md and prints the markdown; a benchmark that fails is recorded
as failed (the others still run) and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import markdown
from benchmarks.shapes import PRESETS

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("train_step", "sampling", "text_to_image", "scaling")


def benchmark_command(name: str, args: argparse.Namespace, json_out: Path) -> list[str]:
    if name == "scaling":
        return [sys.executable, str(REPO / "benchmarks" / "step.py"), "--devices", *map(str, args.scaling_devices),
                "--steps", str(args.scaling_steps), "--json", str(json_out)]
    return [sys.executable, "-m", f"benchmarks.{name}", "--shapes", args.shapes, "--repeats", str(args.repeats),
            "--json", str(json_out)]


def run_benchmark(command: list[str], json_out: Path) -> dict:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit status {done.returncode}: {tail[0]}", "stderr_tail": done.stderr[-4000:]}
    return json.loads(json_out.read_text())


def machine(results: dict, load_average: float) -> dict:
    """Where the suite ran, from the benchmarks' own reports (the suite itself starts no backend)."""
    devices = [r["device"] for r in results.values() if "device" in r]
    device = f"{devices[0]['count']} x {devices[0]['kind']} ({devices[0]['platform']})" if devices else "cpu"
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "cpu_cores": len(os.sched_getaffinity(0)), "load_average": load_average,
            "jax": importlib.metadata.version("jax"), "torch": importlib.metadata.version("torch"),
            "python": sys.version.split()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks", help="directory for suite.json and suite.md")
    parser.add_argument("--shapes", default="auto", choices=["auto", *PRESETS])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--scaling-devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--scaling-steps", type=int, default=40, help="training steps per device count (>= 4)")
    args = parser.parse_args(argv)
    if args.scaling_steps < 4:
        parser.error(f"--scaling-steps {args.scaling_steps}: at least 4 (the second half is timed)")
    load_average = round(os.getloadavg()[0], 2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            json_out = Path(tmp) / f"{name}.json"
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_benchmark(benchmark_command(name, args, json_out), json_out)
    suite = {"machine": machine(results, load_average), "benchmarks": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    table = markdown(suite)
    (out / "suite.md").write_text(table)
    print(table)
    failed = [name for name, result in results.items() if "error" in result]
    if failed:
        print(f"benchmarks.suite: failed: {', '.join(failed)}; see {out / 'suite.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
