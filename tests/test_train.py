"""The training engine in one process: resume equality, damaged checkpoints, EMA, the non-finite guard,
the bf16 teacher, and one clear error for each kind of bad input."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.cli import main
from s2flash_jax.config import TrainConfig, load_config
from s2flash_jax.data.records import write_shards
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.train.state import create_train_state
from s2flash_jax.train.optim import learning_rate_schedule
from s2flash_jax.train.step import train_step
from s2flash_jax.train.loop import train
from tests.conftest import REPO
from tests.tiny_data import write_tiny_dataset

TINY = str(REPO / "configs/tiny.py")
RUN = ["train.steps=4", "train.log_every=0", "train.checkpoint_every=2", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def tiny(data, *overrides):
    return load_config(TINY, [f"data.path={data}", *RUN, *overrides])


def assert_states_equal(a, b):
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_resume_equals_uninterrupted_and_a_damaged_checkpoint_falls_back(dataset, tmp_path, capsys):
    config = tiny(dataset)
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)

    first = train(config, tmp_path / "split", record_losses=True, quiet=True, stop_after=3)
    assert first.step == 3
    shutil.copytree(tmp_path / "split", tmp_path / "damaged")
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert first.losses + rest.losses == whole.losses  # bitwise, data order included
    assert_states_equal(rest.state, whole.state)

    # The newest checkpoint (step 3) is damaged: reported, and the run goes on from step 2.
    for blob in (tmp_path / "damaged" / "checkpoints" / "3" / "state").rglob("d/*"):
        blob.write_bytes(b"not a checkpoint")
    # Checkpointing every step, the resumed run saves step 3 again.
    again = train(tiny(dataset, "train.checkpoint_every=1"), tmp_path / "damaged", resume=True, record_losses=True,
                  quiet=True)
    assert "checkpoints/3 could not be restored" in capsys.readouterr().err
    assert again.losses == whole.losses[2:]
    assert_states_equal(again.state, whole.state)
    # The damaged step was moved aside, kept, so that the resumed run could save its own step 3.
    assert (tmp_path / "damaged" / "checkpoints-damaged" / "3" / "state").is_dir()
    assert sorted(p.name for p in (tmp_path / "damaged" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3", "4"]


def test_step_updates_ema_and_skips_non_finite_updates(dataset):
    config = tiny(dataset, "train.ema_decay=0.5")
    mesh = make_mesh(config.mesh)
    recipe, state, _ = create_train_state(config, mesh)
    shared = "transformer_blocks/attn1/to_q/kernel"
    flat = lambda tree: {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(tree)}  # noqa: E731
    student, teacher = flat(state.distill.params["student"]), flat(state.distill.frozen["teacher"])
    assert np.array_equal(student[shared], teacher[shared])  # the student starts as its teacher
    assert "time_embed/guidance_embedder/linear_1/kernel" in student  # ...plus its own guidance embedder

    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32),
             "caption": jnp.asarray(rng.standard_normal((8, 8, 32)), jnp.float32),
             "caption_mask": jnp.ones((8, 8), jnp.int32)}
    step = jax.jit(lambda s, b: train_step(recipe, 0.5, "generator", s, b))
    before = state
    after, metrics = step(before, batch)
    new, old = flat(after.distill.params["student"]), flat(before.distill.params["student"])
    ema = flat(after.ema["student"])
    changed = [k for k in new if not np.array_equal(new[k], old[k])]
    assert "proj_out/kernel" in changed  # zero-initialised output layer: the first to move
    for k in new:
        np.testing.assert_allclose(ema[k], 0.5 * old[k] + 0.5 * new[k], rtol=1e-6, atol=1e-12, err_msg=k)
    assert int(metrics["skipped_updates"]) == 0 and int(after.step) == 1

    poisoned = {**batch, "latents": batch["latents"].at[0, 0, 0, 0].set(jnp.nan)}
    skipped, metrics = step(after, poisoned)
    assert int(metrics["skipped_updates"]) == 1
    assert all(np.array_equal(v, new[k]) for k, v in flat(skipped.distill.params["student"]).items())


def test_bfloat16_teacher_halves_its_memory_and_keeps_the_loss_close(dataset):
    rng = np.random.default_rng(1)
    batch = {"latents": jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32),
             "caption": jnp.asarray(rng.standard_normal((8, 8, 32)), jnp.float32),
             "caption_mask": jnp.ones((8, 8), jnp.int32)}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny(dataset, f"train.teacher_dtype={dtype}")
        recipe, state, _ = create_train_state(config, make_mesh(config.mesh))
        dtypes = {x.dtype for x in jax.tree.leaves(state.distill.frozen["teacher"])}
        assert dtypes == {jnp.dtype(dtype)}
        _, metrics = jax.jit(lambda s, b: train_step(recipe, 0.9, "discriminator", s, b))(state, batch)
        losses[dtype] = float(metrics["discriminator/loss"])
    assert np.isfinite(losses["bfloat16"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def run_cli(*args):
    return main(["train", "--config", TINY, *map(str, args)])


def test_bad_input_gets_one_clear_error(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--out", out, f"data.path={dataset}", "mesh.data=3") == 2
    assert "mesh data=3 fsdp=1 tensor=1 needs 3 devices, found 1" in capsys.readouterr().err

    wrong = tmp_path / "wrong"
    write_shards([{"latent": np.zeros((16, 16, 4), np.float32), "caption_embedding": np.zeros((4, 32), np.float32),
                   "caption_mask": np.ones(4, np.uint8), "caption": "x"}] * 8, wrong, records_per_shard=8)
    assert run_cli("--out", out, f"data.path={wrong}", "train.steps=1") == 2
    err = capsys.readouterr().err
    assert "latent has shape (16, 16, 4)" in err and "(8, 8, 4)" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-00000-of-00001.array_record").write_bytes(b"\x00" * 100)
    assert run_cli("--out", out, f"data.path={broken}", "train.steps=1") == 2
    assert "train-00000-of-00001.array_record" in capsys.readouterr().err

    assert run_cli("--out", out, f"data.path={dataset}", "train.steps=1", "train.log_every=0") == 0
    assert run_cli("--out", out, f"data.path={dataset}", "train.steps=1") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err
    assert run_cli("--out", out, "--resume", f"data.path={dataset}", "train.steps=2", "train.learning_rate=1") == 2
    assert "config differs in train.learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_over_the_networks_own_updates(kind):
    config = TrainConfig(steps=100, schedule=kind, learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=10)
    schedule = learning_rate_schedule(config, updates=50)  # one network's share when two phases alternate
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(50)], [0.0, 5e-4, 1e-3, 1e-5],
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(schedule(30), 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-5)  # half-way: both kinds


def test_resume_from_the_command_line_past_a_damaged_checkpoint_and_again(dataset, tmp_path, capsys):
    """`train --resume` after the newest checkpoint was damaged: one warning naming it and where it
    went, the run finishes from the one before (saving the damaged step anew), and a second rerun
    finds a complete run with nothing to trip over."""
    out = tmp_path / "run"
    common = [f"data.path={dataset}", *RUN, "train.checkpoint_every=1"]
    assert run_cli("--out", out, "--stop-after", "3", *common) == 0
    for blob in (out / "checkpoints" / "3" / "state").rglob("d/*"):
        blob.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run_cli("--out", out, "--resume", *common) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "could not be restored" in line]
    assert len(warnings) == 1 and "checkpoints/3" in warnings[0] and "checkpoints-damaged/3" in warnings[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == "4"
    assert run_cli("--out", out, "--resume", *common) == 0
    assert "could not be restored" not in capsys.readouterr().err
