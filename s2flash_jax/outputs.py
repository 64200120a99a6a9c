"""Writing run outputs without losing anything: nothing overwritten unless asked, nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


class OutputExists(FileExistsError):
    pass


def refuse_existing_output(path: str | Path, *, force: bool) -> None:
    """OutputExists if `path` is a file or a non-empty directory and not force. Commands call it before
    long work too, so a refusal comes first, not after minutes of reading or quantizing."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not force:
        raise OutputExists(f"output {str(path)!r} already exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def fresh_output_dir(path: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error.

    An existing non-empty `path` is an error unless force=True.
    """
    path = Path(path)
    refuse_existing_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    staging.rename(path)


@contextlib.contextmanager
def fresh_output_file(path: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path that becomes `path` only if the block finishes without error.

    An existing `path` is an error unless force=True.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExists(f"output {str(path)!r} already exists; pass --force to replace it")
    if path.is_dir():
        raise OutputExists(f"output {str(path)!r} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(path)


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
