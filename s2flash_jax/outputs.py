"""Writing run outputs without losing anything: nothing overwritten unless asked, nothing half-written.

Locally an output is written in a hidden staging directory beside it and renamed into place. An
object store has no atomic rename of a directory, so there the staging directory is local and its
files are uploaded once it is complete, marker files (a model checkpoint's model.json) last: an
interrupted upload leaves a directory that readers refuse as incomplete, never one they accept.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
import numpy as np
from etils import epath
from PIL import Image

from s2flash_jax.storage import PathLike, is_nonempty_dir, is_remote, resolve, upload_tree


class OutputExists(FileExistsError):
    pass


def _umask() -> int:
    """This process's umask, read without changing it where the OS says it (os.umask sets it, and
    another thread writing in between would get the wrong mode)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: PathLike, *, directory: bool) -> None:
    """Give a staged output the mode a plain mkdir / open would have (tempfile makes them private:
    0700 / 0600), so that teammates on a shared cluster can read checkpoints and samples as their
    umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def refuse_existing_output(path: PathLike, *, force: bool) -> None:
    """OutputExists if `path` is a file or a non-empty directory and not force. Commands call it before
    long work too, so a refusal comes first, not after minutes of reading or quantizing."""
    path = resolve(path)
    if not force and (is_nonempty_dir(path) or (path.exists() and not path.is_dir())):
        raise OutputExists(f"output {str(path)!r} already exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def fresh_output_dir(path: PathLike, *, force: bool, last: tuple[str, ...] = ()) -> Iterator[epath.Path]:
    """Yield a local staging directory that replaces `path` only if the block finishes without error.

    An existing non-empty `path` is an error unless force=True. last: files (relative paths) that
    mark the directory complete, written after every other file on an object store.
    """
    path = resolve(path)
    refuse_existing_output(path, force=force)
    remote = is_remote(path)
    if not remote:
        path.parent.mkdir(parents=True, exist_ok=True)
    staging = epath.Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=None if remote else path.parent))
    as_umask_allows(staging, directory=True)
    uploading = False
    try:
        yield staging
        if path.exists():
            path.rmtree() if path.is_dir() else path.unlink()
        if remote:
            uploading = True
            upload_tree(staging, path, last=last)
        else:
            staging.rename(path)
    except BaseException:
        if uploading and path.exists():
            path.rmtree()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def fresh_output_file(path: PathLike, *, force: bool) -> Iterator[epath.Path]:
    """Yield a local temporary path that becomes `path` only if the block finishes without error.

    An existing `path` is an error unless force=True.
    """
    path = resolve(path)
    if path.exists() and not force:
        raise OutputExists(f"output {str(path)!r} already exists; pass --force to replace it")
    if path.is_dir():
        raise OutputExists(f"output {str(path)!r} is a directory; expected a file path")
    remote = is_remote(path)
    if not remote:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix,
                                    dir=None if remote else path.parent)
    os.close(handle)
    as_umask_allows(name, directory=False)
    staging = epath.Path(name)
    try:
        yield staging
        if remote:
            path.write_bytes(staging.read_bytes())
        else:
            staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images [..., C] in [0, 1] -> uint8, as written PNGs store them (metrics computed on these equal
    metrics computed on the written files)."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> Image.Image:
    """images: [N, H, W, 3] floats in [0, 1] -> one PIL image, row-major grid with 2-pixel gutters."""
    n, h, w, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.ones((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = image
    return Image.fromarray((np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8))


def save_image(image: Image.Image, path: PathLike, **save_options) -> None:
    """Write a PIL image to `path` (local or object storage; the format from its suffix), creating
    its directory."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()], **save_options)
    path.write_bytes(buffer.getvalue())
