"""Paths are resolved once where they enter: relative local paths become absolute, object-store URIs
are kept as they are, and what cannot be used is refused in one line before any work."""

import importlib.util
import os
import stat

import pytest
from flax import nnx

from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import read_model_config, save_model, stored_params
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.outputs import OutputExists, fresh_output_dir, fresh_output_file
from s2flash_jax import storage
from s2flash_jax.storage import StorageError, is_remote, resolve
from tests.conftest import REPO


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec  # the URI is kept whether or not its filesystem is installed here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gcsfs" else real(name, *a))
    monkeypatch.setattr(storage, "_check_bucket", lambda bucket: None)  # no bucket here: test_object_storage
    assert str(resolve("runs/a")) == str(tmp_path / "runs" / "a")
    assert resolve(resolve("runs/a")) == resolve("runs/a")
    assert str(resolve("gs://bucket/runs/a")) == "gs://bucket/runs/a" and is_remote("gs://bucket/x")
    assert not is_remote("runs/gs://x")


@pytest.mark.parametrize("path, message", [("", "empty path"), ("ftp://host/x", "unsupported scheme 'ftp://'")])
def test_unusable_paths_are_refused_by_name(path, message):
    with pytest.raises(StorageError, match=message):
        resolve(path)


def test_a_bucket_without_its_filesystem_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
    with pytest.raises(StorageError, match=r"pip install 's2flash-jax\[gcs\]' \(installs gcsfs\)"):
        resolve("gs://bucket/run")


def test_a_model_checkpoint_saves_and_loads_at_a_relative_path(tmp_path, monkeypatch):
    """The README's demo died here: orbax refuses relative checkpoint paths."""
    monkeypatch.chdir(tmp_path)
    config = load_config("%s/configs/tiny.py:teacher" % REPO)
    params = nnx.state(SanaTransformer(config.model, precision=config.precision, rngs=nnx.Rngs(0)), nnx.Param)
    save_model("runs/model", config.model, params)
    assert read_model_config("runs/model") == config.model
    assert set(stored_params("runs/model")) == {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(params)}
    with pytest.raises(OutputExists, match="runs/model"):
        save_model("runs/model", config.model, params)


def test_a_failed_output_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), fresh_output_dir(tmp_path / "out", force=False) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, directory_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
                         ids=["umask 022", "umask 077"])
def test_outputs_are_created_as_the_umask_allows(tmp_path, umask, directory_mode, file_mode):
    """Staging through tempfile made every output 0700 / 0600: unreadable by a teammate on a shared cluster."""
    config = load_config(f"{REPO}/configs/tiny.py").model
    previous = os.umask(umask)
    try:
        save_model(tmp_path / "ckpt", config, nnx.state(SanaTransformer(config, rngs=nnx.Rngs(0)), nnx.Param))
        with fresh_output_file(tmp_path / "grid.png", force=False) as staging:
            staging.write_bytes(b"png")
    finally:
        os.umask(previous)
    written = [tmp_path / "grid.png", *(tmp_path / "ckpt").rglob("*"), tmp_path / "ckpt"]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {name: directory_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
