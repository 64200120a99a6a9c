"""Short tiny-config distillation runs in fresh processes, started by tests/test_train_sharded.py with
fake CPU devices set in XLA_FLAGS (fixed when JAX starts). Each prints one JSON line "RESULT {...}".

  python tests/train_worker.py meshes DATA OUT       8 devices: 3 updates on two mesh shapes
  python tests/train_worker.py losses DATA OUT MESH [STOP_AFTER]
                                                     3 updates (or the first STOP_AFTER, then a checkpoint)
                                                     on MESH (e.g. "data=-1"), any process count; a
                                                     multi-process job is joined from S2FLASH_* variables
  python tests/train_worker.py journey DATA RUN REF  one process: RUN (stopped by `losses ... 2`, perhaps
                                                     by other processes on another mesh) resumed on
                                                     data=-1,fsdp=2 and exported at steps 2 and 3; REF the
                                                     same config uninterrupted on fsdp=-1, exported alike
"""

import json
import sys

from s2flash_jax.cli import mesh_overrides
from s2flash_jax.config import load_config
from s2flash_jax.parallel.distributed import initialize
from s2flash_jax.train.loop import train

STEPS = 3


def tiny(data: str, *overrides: str):
    return load_config("configs/tiny.py", [f"data.path={data}", f"train.steps={STEPS}", "train.log_every=0",
                                           "train.checkpoint_every=0", "train.ema_decay=0.5", *overrides])


def losses(config, out, **kwargs) -> list[dict[str, float]]:
    return train(config, out, record_losses=True, quiet=True, force=True, **kwargs).losses


def main(mode: str, data: str, out: str, *rest: str) -> None:
    if mode == "meshes":
        result = {spec: losses(tiny(data, *mesh_overrides(spec)), f"{out}/{spec}")
                  for spec in ("data=8", "data=2,fsdp=2,tensor=2")}
    elif mode == "losses":
        how = initialize()
        import jax

        stop_after = int(rest[1]) if len(rest) > 1 else None
        result = {"joined": how, "processes": jax.process_count(), "devices": jax.device_count(),
                  "losses": losses(tiny(data, *mesh_overrides(rest[0])), out, stop_after=stop_after)}
    elif mode == "journey":
        from s2flash_jax.train.export import export_run

        reference = rest[0]
        uninterrupted = losses(tiny(data, "train.checkpoint_every=2", *mesh_overrides("data=1,fsdp=-1")), reference)
        resumed = train(tiny(data, *mesh_overrides("data=-1,fsdp=2")), out, resume=True, record_losses=True,
                        quiet=True).losses
        exported = {}
        for step in (2, 3):
            for run in (out, reference):
                export_run(run, model=f"{run}-export-{step}", step=step)
            exported[step] = largest_difference(f"{out}-export-{step}", f"{reference}-export-{step}")
        result = {"uninterrupted": uninterrupted, "resumed": resumed, "export_difference": exported}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(result), flush=True)


def largest_difference(a: str, b: str) -> float:
    """The largest absolute difference between two model checkpoints' parameters (inf if their names differ)."""
    import numpy as np

    from s2flash_jax.model_checkpoint import read_stored_params, stored_params

    names = sorted(stored_params(a))
    if names != sorted(stored_params(b)):
        return float("inf")
    x, y = read_stored_params(a, names), read_stored_params(b, names)
    return max(float(np.max(np.abs(x[n].astype(np.float64) - y[n]))) for n in names)


if __name__ == "__main__":
    main(*sys.argv[1:])
