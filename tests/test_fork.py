"""`s2flash train --fork`: a new run that starts from another run's newest checkpoint, keeping its
step (the branches of split-timestep fine-tuning), and one clear error for each fork it refuses."""

import json

import pytest

from s2flash_jax.cli import main
from s2flash_jax.train.checkpoint import RunCheckpoints
from s2flash_jax.train.loop import FORKED_FROM, RunError, train
from tests.test_train import RUN, TINY, assert_states_equal, tiny
from tests.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def parent(dataset, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) and its final state."""
    out = tmp_path_factory.mktemp("parent") / "run"
    return out, train(tiny(dataset), out, quiet=True)


def run_cli(out, *overrides, fork=None, resume=False):
    """`s2flash train` into `out` with the parent's overrides (tests/test_train.py RUN), then `overrides`."""
    flags = [*(["--fork", str(fork)] if fork else []), *(["--resume"] if resume else [])]
    return main(["train", "--config", TINY, "--out", str(out), *flags, *RUN, *map(str, overrides)])


def test_fork_starts_from_the_parents_newest_checkpoint_and_keeps_its_step(dataset, parent, tmp_path, capsys):
    parent_dir, finished = parent
    branch = tmp_path / "branch"
    # stop_after=0: the fork's state before its first update, which is the parent's step-4 state.
    start = train(tiny(dataset, "train.steps=6", "seed=1"), branch, fork_from=parent_dir, stop_after=0)
    assert f"forked from {parent_dir} at step 4" in capsys.readouterr().out
    assert start.step == 4 and int(start.state.step) == 4
    assert_states_equal(start.state, finished.state)  # every network, optimizer state, EMA and key
    assert json.loads((branch / FORKED_FROM).read_text()) == {"parent": str(parent_dir.absolute()), "step": 4}
    saved = json.loads((branch / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["seed"] == 1  # the fork's own config

    # It stopped before its first checkpoint: resuming forks again from the recorded parent, then
    # trains on to train.steps (global), its health baseline at the fork step.
    code = run_cli(branch, f"data.path={dataset}", "train.steps=6", "seed=1", "health.every=2", "health.teacher_steps=2",
                   resume=True)
    assert code == 0 and f"forked from {parent_dir.absolute()} at step 4" in capsys.readouterr().out
    assert RunCheckpoints(branch / "checkpoints", keep=3).steps() == [6]
    assert [check["step"] for check in json.loads((branch / "health.json").read_text())] == [4, 6]
    assert RunCheckpoints(parent_dir / "checkpoints", keep=3).steps() == [2, 4]  # the parent is untouched

    # Once the fork has checkpoints of its own, resuming it is any resume: fork_from is ignored.
    again = train(tiny(dataset, "train.steps=8", "seed=1"), branch, resume=True, fork_from=parent_dir,
                  stop_after=0)
    assert again.step == 6 and "resumed from" in capsys.readouterr().out


def test_forks_that_cannot_continue_the_parent_are_refused_by_name(dataset, parent, tmp_path, capsys):
    parent_dir, _ = parent
    out = tmp_path / "branch"
    cases = [
        (parent_dir, ["train.steps=4"], "cannot fork", "at step 4 with train.steps=4", "set it above 4"),
        (parent_dir, ["train.steps=6", "train.learning_rate=1"], "the config differs in train.learning_rate",
         "sd35_flash.step_range, seed may change"),
        (tmp_path / "nothing", ["train.steps=6"], "it has no config.json, so it is not a run directory"),
    ]
    without_checkpoints = tmp_path / "new"
    without_checkpoints.mkdir()
    (without_checkpoints / "config.json").write_text((parent_dir / "config.json").read_text())
    cases.append((without_checkpoints, ["train.steps=6"], "it has no checkpoints/ to start from"))
    for source, overrides, *messages in cases:
        assert run_cli(out, f"data.path={dataset}", *overrides, fork=source) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(m in err for m in messages), err
        assert not out.exists()  # nothing written
    assert sorted(p.name for p in without_checkpoints.iterdir()) == ["config.json"]  # and nothing made there

    (without_checkpoints / "checkpoints").mkdir()
    with pytest.raises(RunError, match="it has no checkpoint yet"):
        train(tiny(dataset, "train.steps=6"), out, fork_from=without_checkpoints, quiet=True)

    out.mkdir()
    (out / "mine.txt").write_text("mine")
    assert run_cli(out, f"data.path={dataset}", "train.steps=6", fork=parent_dir) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(RunError, match="is the run directory being written"):
        train(tiny(dataset, "train.steps=6"), parent_dir, fork_from=parent_dir, force=True, quiet=True)
    assert RunCheckpoints(parent_dir / "checkpoints", keep=3).steps() == [2, 4]
