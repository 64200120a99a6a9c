"""Run checkpoints: the train state and the run's metadata (step, data position, config), saved together.

Built on orbax's `CheckpointManager`: saves are asynchronous (training continues while arrays are
written), atomic (a step directory only counts once orbax has committed it) and only the newest
`keep` are kept. Each process writes its own shards of the state. Restoring takes a target whose
arrays carry the *new* run's shardings, so a checkpoint saved on one mesh restores onto any other,
by any number of processes: the data position is one global number in the metadata
(`data_batches`, see data/pipeline.py), not a per-process iterator state. A checkpoint that fails
to restore is reported, moved aside to `<directory>-damaged/<step>`, and the one before it is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from s2flash_jax.storage import PathLike, move_tree, resolve


@dataclass
class Restored:
    step: int
    state: Any
    meta: dict


class NoCheckpointRestores(RuntimeError):
    """Every checkpoint of a run failed to restore (each failure was reported)."""


class RunCheckpoints:
    """Checkpoints of one run under `directory` (created if missing)."""

    def __init__(self, directory: PathLike, *, keep: int, asynchronous: bool = True):
        self.directory = resolve(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts writing; returns before the arrays are on disk when asynchronous."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore_newest(self, target: Any) -> Restored | None:
        """The newest checkpoint that restores, onto `target` (see sharded_shapes). None if there is
        no checkpoint; an error if none restores."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 — any failure means this step is unusable
                aside = self._set_aside(step)
                print(f"checkpoint {self.directory / str(step)} could not be restored "
                      f"({type(e).__name__}: {_first_line(e)}); moved it to {aside}, trying the one before it",
                      file=sys.stderr)
                continue
            return Restored(step, restored.state, restored.meta)
        if steps:
            raise NoCheckpointRestores(f"none of the checkpoints {steps} in {self.directory} could be restored")
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Move a step that does not restore out of orbax's sight, kept for inspection: left in place,
        the resumed run would retrain up to its step and then fail to save over it."""
        aside = self.directory.parent / f"{self.directory.name}-damaged" / str(step)
        if jax.process_index() == 0:
            n = 1
            while aside.exists():
                aside, n = aside.with_name(f"{step}.{n}"), n + 1
            move_tree(self.directory / str(step), aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
