"""pytorch-fid's Inception weights -> `s2flash_jax.eval.inception.InceptionV3`, and a torch-free copy of them.

pytorch-fid publishes the FID Inception (TensorFlow's 2015-12-05 graph, ported) as
`pt_inception-2015-12-05-6726825d.pth`, a torch state dict of torchvision's Inception3 with the
FID blocks (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, ...). The JAX
modules carry the same names, so a row of the key table is the torch key with '/' for '.' and
'kernel' for a conv's 'weight', plus the OIHW -> HWIO transpose. The classifier (`fc.*`, 1008
classes), an auxiliary head (`AuxLogits.*`) and batch-norm step counters are not features and are
skipped; every other tensor must fill exactly one parameter.

Reading the .pth needs torch (this is the torch boundary). `save_inception` writes the same tensors
as a .safetensors file (or `.npz`), which `load_inception` then reads without torch:

    python -m conversion.inception pt_inception-2015-12-05-6726825d.pth inception-fid.safetensors
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.dc_ae import CONV2D
from conversion.errors import ConversionError
from conversion.layouts import COPY
from conversion.safetensors_io import SafetensorsFile, TensorSpec, write_file
from conversion.sana_diffusers import Row
from conversion.sources import (TORCH_SUFFIXES, TensorSource, TorchStateDict, _load_torch_file, check_tensors,
                                fill_params)
from s2flash_jax.eval.inception import InceptionV3
from s2flash_jax.models.params import flat_params, param_paths
from s2flash_jax.outputs import fresh_output_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
SKIPPED_PREFIXES = ("fc.", "AuxLogits.")
SKIPPED_SUFFIXES = (".num_batches_tracked",)
EXPECTED = (f"pytorch-fid's {WEIGHTS_NAME} (a torch state dict) or its conversion to .safetensors / .npz "
            "(python -m conversion.inception)")


@functools.lru_cache(maxsize=1)
def param_shapes() -> dict[str, tuple[int, ...]]:
    """'/'-joined JAX parameter path -> shape (nothing allocated)."""
    return {path: shape for path, (shape, _) in param_paths(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))).items()}


def key_table() -> list[Row]:
    """One row per torch tensor the features need: conv kernels transposed, batch-norm vectors copied."""
    rows = []
    for path in param_shapes():
        if path.endswith("/conv/kernel"):
            rows.append(Row(path[:-len("kernel")].replace("/", ".") + "weight", path, CONV2D))
        else:
            rows.append(Row(path.replace("/", "."), path, COPY))
    return rows


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    shapes = param_shapes()
    return {row.torch_key: tuple(row.layout.torch_shape(shapes[row.jax_path])) for row in key_table()}


def _skipped(key: str) -> bool:
    return key.startswith(SKIPPED_PREFIXES) or key.endswith(SKIPPED_SUFFIXES)


class NpzSource:
    """The arrays of a .npz file as a TensorSource."""

    def __init__(self, path: Path):
        try:
            self._arrays = dict(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise ConversionError(f"{path} cannot be read as a .npz file ({e}); expected {EXPECTED}") from e

    def keys(self) -> list[str]:
        return list(self._arrays)

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(tuple(self._arrays[name].shape), self._arrays[name].dtype)

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]


def open_weights(path: str | Path) -> TensorSource:
    """The tensors of a pytorch-fid weights file (.pth / .pt: needs torch) or of its .safetensors / .npz copy."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Inception weights {str(path)!r} do not exist; expected {EXPECTED}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix == ".npz":
        return NpzSource(path)
    if path.suffix in TORCH_SUFFIXES:
        loaded = _load_torch_file(path)
        if not isinstance(loaded, dict):
            raise ConversionError(f"{path} holds a {type(loaded).__name__}; expected {EXPECTED}")
        return TorchStateDict(loaded)
    raise ConversionError(f"{path} is a file of unknown kind ({path.suffix or 'no suffix'}); expected {EXPECTED}")


def inception_from_source(source: TensorSource, what: str = "state dict") -> InceptionV3:
    """An InceptionV3 (float32) filled from `source` (torch names and layouts). One ConversionError
    names the missing, unexpected and mis-shaped tensors, or non-float ones."""
    check_tensors(source, expected_torch_shapes(), what, "{what} is not the FID Inception: {problems}; expected " + EXPECTED,
                  keys=[key for key in source.keys() if not _skipped(key)])
    return fill_params(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))), key_table(), source, jnp.float32)


def load_inception(path: str | Path) -> InceptionV3:
    """The FID InceptionV3 from pytorch-fid's weights file or its .safetensors / .npz copy."""
    return inception_from_source(open_weights(path), str(path))


def inception_state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
    """The model's weights under pytorch-fid's names and layouts (float32)."""
    params = flat_params(model)
    return {row.torch_key: np.ascontiguousarray(row.layout.to_torch(np.asarray(params[row.jax_path], np.float32)))
            for row in key_table()}


def save_inception(model: InceptionV3, path: str | Path, *, force: bool = False) -> Path:
    """Write the weights under pytorch-fid's names to `.safetensors` or `.npz`, readable without
    torch; the file appears only when complete."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".npz"):
        raise ConversionError(f"{path}: expected a .safetensors or .npz output path")
    tensors = inception_state_dict(model)
    with fresh_output_file(path, force=force) as staging:
        if path.suffix == ".npz":
            with staging.open("wb") as f:
                np.savez(f, **tensors)
        else:
            write_file(staging, [(k, TensorSpec(v.shape, v.dtype)) for k, v in tensors.items()], tensors.__getitem__)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.inception",
                                     description="Convert pytorch-fid's Inception weights (.pth) to a .safetensors "
                                                 "or .npz file that `s2flash eval --inception` reads without torch.")
    parser.add_argument("src", help=f"the weights, e.g. {WEIGHTS_NAME}")
    parser.add_argument("out", help="the .safetensors or .npz file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from s2flash_jax.outputs import OutputExists

    try:
        print(f"wrote {save_inception(load_inception(args.src), args.out, force=args.force)}")
    except (ConversionError, OutputExists) as e:
        print(f"conversion.inception: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
