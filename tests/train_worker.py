"""Short tiny-config distillation runs in fresh processes, started by tests/test_train_sharded.py with
fake CPU devices set in XLA_FLAGS (fixed when JAX starts). Each prints one JSON line "RESULT {...}".

  python tests/train_worker.py meshes DATA OUT       8 devices: 3 updates on two mesh shapes
  python tests/train_worker.py remesh DATA OUT       4 devices: save on (fsdp=4), resume on (data=2, fsdp=2)
  python tests/train_worker.py losses DATA OUT MESH  3 updates on MESH (e.g. "data=-1"), any process count;
                                                     a multi-process job is joined from S2FLASH_* variables
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
    elif mode == "remesh":
        fsdp4 = mesh_overrides("data=1,fsdp=4")
        uninterrupted = losses(tiny(data, *fsdp4), f"{out}/whole")
        first = losses(tiny(data, *fsdp4), f"{out}/split", stop_after=2)
        rest_ = train(tiny(data, *mesh_overrides("data=2,fsdp=2")), f"{out}/split", resume=True,
                      record_losses=True, quiet=True).losses
        result = {"uninterrupted": uninterrupted, "resumed": first + rest_}
    elif mode == "losses":
        how = initialize()
        import jax

        result = {"joined": how, "processes": jax.process_count(), "devices": jax.device_count(),
                  "losses": losses(tiny(data, *mesh_overrides(rest[0])), out)}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
