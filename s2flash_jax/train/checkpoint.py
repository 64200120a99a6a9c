"""Run checkpoints: the train state, the data iterator position and the run's metadata, saved together.

Built on orbax's `CheckpointManager`: saves are asynchronous (training continues while arrays are
written), atomic (a step directory only counts once orbax has committed it) and only the newest
`keep` are kept. Each process writes its own shards of the state and its own data-iterator state.
Restoring takes a target whose arrays carry the *new* run's shardings, so a checkpoint saved on
one mesh restores onto any other, but only with as many processes as wrote it (each process's
data-iterator position is its own). A checkpoint that fails to restore is reported and the one
before it is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from s2flash_jax.storage import PathLike, resolve


@dataclass
class Restored:
    step: int
    state: Any
    meta: dict


class NoCheckpointRestores(RuntimeError):
    """Every checkpoint of a run failed to restore (each failure was reported)."""


class ProcessCountMismatch(ValueError):
    """A run resumed with another number of processes than wrote its checkpoints."""


class RunCheckpoints:
    """Checkpoints of one run under `directory` (created if missing)."""

    def __init__(self, directory: PathLike, *, keep: int, asynchronous: bool = True):
        self.directory = resolve(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        """Starts writing; returns before the arrays are on disk when asynchronous."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({**meta, "process_count": jax.process_count()})), force=True)

    def restore_newest(self, target: Any, data_iterator: Any | None) -> Restored | None:
        """The newest checkpoint that restores, onto `target` (see sharded_shapes); the data iterator
        is moved to the saved position. None if there is no checkpoint; an error if none restores.

        data_iterator None: the state and metadata alone, the saved data positions left unread (a
        fork's data starts afresh), so any number of processes may restore them."""
        steps = self.steps()
        if steps and data_iterator is not None:
            self._check_process_count(steps[-1])
        data = {} if data_iterator is None else {"data": grain.checkpoint.CheckpointRestore(data_iterator)}
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(), **data))
            except Exception as e:  # noqa: BLE001 — any failure means this step is unusable
                print(f"checkpoint {self.directory / str(step)} could not be restored "
                      f"({type(e).__name__}: {_first_line(e)}); trying the one before it", file=sys.stderr)
                continue
            return Restored(step, restored.state, restored.meta)
        if steps:
            raise NoCheckpointRestores(f"none of the checkpoints {steps} in {self.directory} could be restored")
        return None

    def _check_process_count(self, step: int) -> None:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # noqa: BLE001 — an unreadable checkpoint is reported by the restore loop
            return
        saved = meta.get("process_count")
        if saved is not None and saved != jax.process_count():
            raise ProcessCountMismatch(
                f"checkpoint {self.directory / str(step)} was written by {saved} process(es) and this run has "
                f"{jax.process_count()}: each process saved its own data-iterator position, so resume with "
                f"{saved} process(es) (any mesh shape), or start a new run from an exported model")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
