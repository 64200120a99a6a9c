"""`s2flash merge` (s2flash_jax/merge.py): weight interpolation of model checkpoints, exact where it
should be, and one clear error, with nothing written, for each kind of bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tiny import STUDENT
from s2flash_jax.cli import main
from s2flash_jax.merge import MergeError, merge_checkpoints
from s2flash_jax.model_checkpoint import CheckpointError, read_metadata, read_stored_params, save_model, stored_params
from s2flash_jax.models.params import flat_params
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.outputs import OutputExists
from s2flash_jax.precision import FP32
from s2flash_jax.quantize import quantize_checkpoint

# qwix 0.1.8 calls nnx APIs that flax 0.12 deprecates (the quantized-input case quantizes a checkpoint).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")


def save_random(path, config=STUDENT, seed=0, dtype=jnp.float32):
    """A checkpoint of `config` with every parameter random (none left at zero or one)."""
    params = flat_params(SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed), len(params)))
    tree = {}
    for name, value in params.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = (value + 0.1 * jax.random.normal(next(keys), value.shape)).astype(dtype)
    return save_model(path, config, tree, metadata={"sampling": {"guidance_scale": 3.0}})


def read_all(path):
    return read_stored_params(path, list(stored_params(path)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return save_random(root / "a", seed=0), save_random(root / "b", seed=1)


def test_merge_is_the_weighted_sum_of_every_parameter(pair, tmp_path):
    a, b = pair
    result = merge_checkpoints(pair, tmp_path / "merged", weights=(0.3, 0.7))
    merged, va, vb = read_all(tmp_path / "merged"), read_all(a), read_all(b)
    assert set(merged) == set(va) and result.parameters == sum(v.size for v in va.values())
    for name, value in merged.items():
        assert value.dtype == va[name].dtype, name
        np.testing.assert_allclose(value, 0.3 * va[name] + 0.7 * vb[name], rtol=1e-6, atol=1e-7, err_msg=name)
    meta = read_metadata(tmp_path / "merged")
    assert meta["merge"] == {"sources": [str(a), str(b)], "weights": [0.3, 0.7]}
    assert meta["sampling"] == {"guidance_scale": 3.0}  # the first source's metadata carried over

    merge_checkpoints(pair, tmp_path / "equal")
    for name, value in read_all(tmp_path / "equal").items():
        np.testing.assert_allclose(value, 0.5 * va[name] + 0.5 * vb[name], rtol=1e-6, atol=1e-7, err_msg=name)

    merge_checkpoints(pair, tmp_path / "first", weights=(1, 0))
    for name, value in read_all(tmp_path / "first").items():
        assert value.tobytes() == va[name].tobytes(), name


def test_bfloat16_checkpoints_are_summed_in_float32_and_stored_in_bfloat16(tmp_path):
    a, b = (save_random(tmp_path / name, seed=seed, dtype=jnp.bfloat16) for name, seed in (("a", 0), ("b", 1)))
    merge_checkpoints((a, b), tmp_path / "merged", weights=(0.25, 0.75))
    va, vb = read_all(a), read_all(b)
    for name, value in read_all(tmp_path / "merged").items():
        assert value.dtype == jnp.bfloat16, name
        expected = (0.25 * va[name].astype(np.float32) + 0.75 * vb[name].astype(np.float32)).astype(jnp.bfloat16)
        assert value.tobytes() == expected.tobytes(), name


def test_bad_input_is_refused_by_name_and_writes_nothing(pair, tmp_path):
    a, b = pair
    other = save_random(tmp_path / "deeper", dataclasses.replace(STUDENT, num_layers=3))
    quantized = tmp_path / "int8"
    quantize_checkpoint(a, quantized, bits=8)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())

    cases = [
        (MergeError, ((a, b), tmp_path / "x", (0.5,)), "1 weight(s) for 2 checkpoint(s)"),
        (MergeError, ((a, b), tmp_path / "x", (1.5, -0.5)), "expected non-negative numbers summing to 1"),
        (MergeError, ((a, b), tmp_path / "x", (0.5, 0.6)), "they sum to 1.1"),
        (CheckpointError, ((a, other), tmp_path / "x", None), "different architecture: num_layers=3 (expected 2)"),
        (MergeError, ((a, quantized), tmp_path / "x", None), "is quantized (int8)"),
        (OutputExists, ((a, b), existing, None), "already exists and is not empty; pass --force"),
        (OutputExists, ((a, b), a, None), "is one of the checkpoints being merged"),
    ]
    for error, (sources, out, weights), message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            merge_checkpoints(sources, out, weights=weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging left behind
    assert (existing / "mine.txt").read_text() == "mine"


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main(["merge", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_merges_and_names_what_is_wrong(pair, tmp_path, capsys):
    a, b = pair
    code, out, err = run_cli(capsys, a, b, "--weights", 0.3, 0.7, "--out", tmp_path / "merged")
    assert code == 0, err
    assert f"merged 2 checkpoints ({a} x 0.3, {b} x 0.7)" in out and "parameters each; wrote" in out
    assert json.loads((tmp_path / "merged" / "model.json").read_text())["merge"]["weights"] == [0.3, 0.7]

    code, _, err = run_cli(capsys, a, b, "--weights", 0.3, 0.7, "--out", tmp_path / "merged")
    assert code == 2 and "already exists and is not empty; pass --force" in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, a, b, "--weights", 1, "--out", tmp_path / "x")
    assert code == 2 and "--weights: 1 weight(s) for 2 checkpoint(s)" in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, a, tmp_path / "nothing", "--out", tmp_path / "x")
    assert code == 2 and "is not a model checkpoint: it has no model.json" in err, err
    assert not (tmp_path / "x").exists()

    code, out, err = run_cli(capsys, a, b, "--out", tmp_path / "merged", "--force")
    assert code == 0 and "x 0.5" in out, err
