"""Values that make no sense are refused before any work, in one line naming the flag and what was
expected, with exit code 2 (issue 49 item 6): a nan guidance scale once wrote a black PNG and
exited 0, `--batch-size 0` and `--stop-after 0` were taken, `plan --devices 100000` hung."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2flash_jax.cli import MAX_PLAN_DEVICES, main
from tests.conftest import REPO

CASES = [
    (["sample", "--ckpt", "CKPT", "--prompt", "a", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["sample", "--ckpt", "CKPT", "--prompt", "a", "--steps", "two"],
     "argument --steps: expected an integer >= 1, got 'two'"),
    (["sample", "--ckpt", "CKPT", "--prompt", "a", "--guidance-scale", "nan"],
     "argument --guidance-scale: expected a finite number >= 0, got nan"),
    (["sample", "--ckpt", "CKPT", "--prompt", "a", "--guidance-scale", "-1"],
     "argument --guidance-scale: expected a finite number >= 0, got -1"),
    (["sample", "--ckpt", "CKPT", "--prompt", "a", "--batch-size", "0"],
     "argument --batch-size: expected an integer >= 1, got 0"),
    (["train", "--config", "configs/tiny.py", "--out", "OUT", "--stop-after", "-3"],
     "argument --stop-after: expected an integer >= 1, got -3"),
    (["plan", "--config", "configs/tiny.py", "--devices", "100000"],
     f"argument --devices: expected an integer from 1 to {MAX_PLAN_DEVICES}, got 100000"),
    (["export", "RUN", "--model", "OUT", "--step", "-1"], "argument --step: expected an integer >= 0, got -1"),
    (["merge", "A", "B", "--weights", "0.5", "inf", "--out", "OUT"],
     "argument --weights: expected a finite number, got inf"),
    (["eval", "--ckpt", "CKPT", "--limit", "0"], "argument --limit: expected an integer >= 1, got 0"),
    (["eval", "--ckpt", "CKPT", "--guidance-scale", "inf"],
     "argument --guidance-scale: expected a finite number >= 0, got inf"),
    (["precompute", "--images", "IN", "--out", "OUT", "--resolution", "256", "--batch-size", "0"],
     "argument --batch-size: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in CASES])
def test_a_nonsensical_value_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_installed_command_refuses_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "s2flash_jax.cli", "sample", "--ckpt", str(tmp_path), "--prompt",
                             "a", "--guidance-scale", "nan", "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("s2flash sample: error: argument --guidance-scale: expected a finite number >= 0, got nan; "
                             "see s2flash sample --help\n")
    assert list(tmp_path.iterdir()) == []
