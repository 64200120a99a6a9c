"""Every command that writes, given relative paths from a fresh working directory, as a user types
them. The README's first command died this way after five minutes: orbax refuses a relative
checkpoint path, and no test had run a writer from anywhere but an absolute temporary path."""

import subprocess
import sys

import numpy as np

from s2flash_jax.model_checkpoint import read_stored_params, stored_params
from tests.conftest import REPO, fake_devices_env
from tests.relative_paths_worker import COMMANDS


def test_every_writer_takes_relative_paths(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "relative_paths_worker.py")], cwd=tmp_path,
                            env=fake_devices_env(1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("OK: ") == len(COMMANDS)
    for _, outputs in COMMANDS:  # written under the working directory the paths were relative to
        assert all((tmp_path / p).exists() for p in outputs)

    # `s2flash export RUN_DIR` afterwards writes what `train --export` wrote at the end of the run.
    names = list(stored_params(tmp_path / "models/student"))
    trained = read_stored_params(tmp_path / "models/student", names)
    exported = read_stored_params(tmp_path / "models/student-again", names)
    assert set(stored_params(tmp_path / "models/student-again")) == set(names)
    for name in names:
        np.testing.assert_array_equal(exported[name], trained[name], err_msg=name)
