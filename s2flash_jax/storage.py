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

import functools
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
    """A path that cannot be used: an unknown scheme, a filesystem that is not installed, or a bucket
    that does not exist or cannot be reached."""


def is_remote(path: PathLike) -> bool:
    """Whether `path` is an object-store URI (gs://, s3://) rather than a local path."""
    return os.fspath(path).startswith(tuple(OBJECT_STORES))


def resolve(path: PathLike) -> epath.Path:
    """`path` as every command uses it: a local path made absolute, an object-store URI checked to
    have its filesystem installed and its bucket reachable (once per bucket). Idempotent."""
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
    _check_bucket(f"{prefix}{text[len(prefix):].split('/', 1)[0]}")
    return epath.Path(text)


@functools.cache
def _check_bucket(bucket: str) -> None:
    """StorageError unless the bucket exists and these credentials can see it: said once, where the
    path enters, instead of as a traceback from the first write minutes later."""
    try:
        exists = epath.Path(bucket).exists()
    except Exception as e:  # noqa: BLE001 — whatever the client raises, the cause is the same few things
        raise StorageError(f"cannot reach {bucket}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                           " (credentials: `gcloud auth application-default login` or "
                           "GOOGLE_APPLICATION_CREDENTIALS)") from None
    if not exists:
        raise StorageError(f"bucket {bucket} does not exist, or these credentials cannot see it")


def is_nonempty_dir(path: epath.Path) -> bool:
    return path.is_dir() and next(iter(path.iterdir()), None) is not None


def files_under(root: epath.Path) -> list[str]:
    """Relative posix paths of the files under `root`, sorted. Walks (epath has no recursive glob
    on object stores), and takes names relative by text: on gcsfs the walk's directories come back
    without their gs:// scheme."""
    base = str(root).split("://", 1)[-1].rstrip("/")
    found = []
    for directory, _, names in root.walk():
        relative = str(directory).split("://", 1)[-1].rstrip("/")[len(base):].strip("/")
        found += [f"{relative}/{name}" if relative else name for name in names]
    return sorted(found)


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
    files = files_under(local)
    _copy_files(local, remote, [n for n in files if n not in last] + [n for n in last if n in files])


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Move the directory `source` to `target` (which must not exist): a rename on local disk; on an
    object store, which has no directories to rename, each file copied and then the source removed."""
    if not is_remote(source) and not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return
    _copy_files(source, target, files_under(source))
    source.rmtree()


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
            _copy_files(path, target, files_under(path))
        else:
            target.write_bytes(path.read_bytes())
        yield target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
