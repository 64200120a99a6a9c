"""Where files live: local disk or object storage (gs://, s3://), behind one path type.

Pod and cluster runs read data and write run directories, checkpoints and exports in buckets; a
laptop run uses relative local paths. Every path a command or library entry point takes goes
through `resolve` once: a local path becomes absolute there (orbax refuses relative checkpoint
paths, and the processes of a job need not share a working directory), an object-store URI stays as
it is, and a URI whose filesystem is not installed is refused in one line before any work starts.

The returned `etils.epath.Path` has pathlib's methods on both (epath is what orbax itself uses;
object stores go through fsspec: gcsfs for gs://, s3fs for s3://). orbax and ArrayRecord readers
talk to buckets directly; writers that only know local files (PIL, safetensors, ArrayRecord's
writer) write to a local staging directory that `upload_tree` copies up (outputs.py does this).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from etils import epath

# URI prefix -> (the fsspec filesystem package epath needs for it, the extra that installs it).
OBJECT_STORES = {"gs://": ("gcsfs", "gcs"), "s3://": ("s3fs", "s3")}

PathLike = str | os.PathLike


class StorageError(ValueError):
    """A path that cannot be used: an unknown scheme or a filesystem that is not installed."""


def is_remote(path: PathLike) -> bool:
    """Whether `path` is an object-store URI (gs://, s3://) rather than a local path."""
    return os.fspath(path).startswith(tuple(OBJECT_STORES))


def resolve(path: PathLike) -> epath.Path:
    """`path` as every command uses it: a local path made absolute, an object-store URI checked to
    have its filesystem installed. Idempotent."""
    text = os.fspath(path)
    if not text:
        raise StorageError("empty path; expected a local path or a gs:// / s3:// URI")
    scheme, sep, _ = text.partition("://")
    if not sep:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    prefix = scheme + "://"
    if prefix not in OBJECT_STORES:
        raise StorageError(f"path {text!r}: unsupported scheme {prefix!r}; expected a local path or one of "
                           f"{', '.join(OBJECT_STORES)}")
    package, extra = OBJECT_STORES[prefix]
    # epath prefers TensorFlow's gfile when TensorFlow is installed; otherwise fsspec needs the package.
    if importlib.util.find_spec(package) is None and importlib.util.find_spec("tensorflow") is None:
        raise StorageError(f"path {text!r} is on object storage, whose filesystem is not installed: "
                           f"pip install 's2flash-jax[{extra}]' (installs {package})")
    return epath.Path(text)


def is_nonempty_dir(path: epath.Path) -> bool:
    return path.is_dir() and next(iter(path.iterdir()), None) is not None


def _files_under(root: epath.Path) -> list[str]:
    """Relative posix paths of the files under `root`, sorted (epath has no recursive glob on
    object stores, so walk)."""
    return sorted((directory / name).relative_to(root).as_posix()
                  for directory, _, names in root.walk() for name in names)


def _copy_files(source: epath.Path, target: epath.Path, names: Sequence[str]) -> None:
    for name in names:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes((source / name).read_bytes())


def upload_tree(local: PathLike, remote: epath.Path, *, last: Sequence[str] = ()) -> None:
    """Copy the files under the local directory `local` to `remote` (created), the relative paths in
    `last` after all others: readers that take a marker file (a model checkpoint's model.json) as the
    sign of a complete directory never see one before the files it vouches for."""
    local = epath.Path(local)
    files = _files_under(local)
    _copy_files(local, remote, [n for n in files if n not in last] + [n for n in last if n in files])


@contextmanager
def local_copy(path: epath.Path) -> Iterator[epath.Path]:
    """A local directory or file with the contents of `path`: `path` itself when it is local, else a
    temporary download (removed afterwards). For readers that only open local files (tokenizers,
    safetensors) of small components."""
    if not is_remote(path):
        yield path
        return
    staging = epath.Path(tempfile.mkdtemp(prefix="s2flash-download-"))
    try:
        target = staging / path.name
        if path.is_dir():
            _copy_files(path, target, _files_under(path))
        else:
            target.write_bytes(path.read_bytes())
        yield target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
