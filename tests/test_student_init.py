"""Where a run's trained network starts: a copy of the teacher that computes exactly what the teacher
does, a checkpoint given by --student-init, and trainable subsets (train.trainable)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.cli import main
from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import load_params, save_model
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.train.loop import train
from s2flash_jax.train.state import create_train_state
from s2flash_jax.train.step import train_step
from tests.conftest import REPO
from tests.tiny_data import write_tiny_dataset

TINY = str(REPO / "configs/tiny.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def random_checkpoint(path, model_config, seed):
    """A checkpoint whose every parameter is random (no zero output layer that hides differences)."""
    state = nnx.state(SanaTransformer(model_config, rngs=nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    noisy = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    return save_model(path, model_config, noisy)


def flat(tree):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"latents": jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32),
            "caption": jnp.asarray(rng.standard_normal((8, 8, 32)), jnp.float32),
            "caption_mask": jnp.ones((8, 8), jnp.int32)}


def test_the_default_student_computes_exactly_the_teacher_and_learns_guidance(dataset, tmp_path):
    config = load_config(TINY, [f"data.path={dataset}"])
    teacher_ckpt = random_checkpoint(tmp_path / "teacher", config.teacher, seed=3)
    config = load_config(TINY, [f"data.path={dataset}", f"train.teacher_checkpoint={teacher_ckpt}",
                                "train.optimizer=adamw", "train.learning_rate=1e-2"])
    recipe, state, _ = create_train_state(config, make_mesh(config.mesh))

    def student_and_teacher(state):
        student = nnx.merge(nnx.graphdef(SanaTransformer(config.model, rngs=nnx.Rngs(0))),
                            state.distill.params["student"])
        teacher = nnx.merge(nnx.graphdef(SanaTransformer(config.teacher, rngs=nnx.Rngs(0))),
                            state.distill.frozen["teacher"])
        return student, teacher

    batch = tiny_batch()
    x, caption, mask = batch["latents"], batch["caption"], batch["caption_mask"]
    s = jnp.linspace(0.05, 0.95, 8)
    student, teacher = student_and_teacher(state)
    expected = np.asarray(teacher(x, s, caption, mask))
    assert np.abs(expected).max() > 0.1  # a real output, not the zero of a fresh proj_out
    for guidance in (0.0, 0.45, 0.9):
        np.testing.assert_array_equal(np.asarray(student(x, s, caption, mask, jnp.full((8,), guidance))), expected)
    # The logvar head (the sCM loss's weight, not part of the velocity) keeps its own initialisation.
    assert np.abs(flat(state.distill.params["student"])["logvar_linear/kernel"]).max() > 0

    # Only the guidance embedder's output layer is zero: its first layer still passes a gradient,
    # so a few updates make the student depend on its guidance input.
    step = jax.jit(lambda st, b: train_step(recipe, 0.0, "generator", st, b))
    for i in range(3):
        state, _ = step(state, tiny_batch(i))
    student, _ = student_and_teacher(state)
    low, high = (np.asarray(student(x, s, caption, mask, jnp.full((8,), g))) for g in (0.0, 0.9))
    assert np.abs(low - high).max() > 1e-4
    moved = flat(state.distill.params["student"])
    assert np.abs(moved["time_embed/guidance_embedder/linear_1/kernel"]).max() > 0


def test_student_init_checkpoint_is_the_starting_point_and_must_fit(dataset, tmp_path, capsys):
    config = load_config(TINY, [f"data.path={dataset}"])
    start = random_checkpoint(tmp_path / "start", config.model, seed=5)
    config = load_config(TINY, [f"data.path={dataset}", f"train.init_checkpoint={start}"])
    _, state, _ = create_train_state(config, make_mesh(config.mesh))
    saved = flat(nnx.state(SanaTransformer(config.model, rngs=nnx.Rngs(0))))  # only for the paths
    got = flat(state.distill.params["student"])
    assert got.keys() == saved.keys()
    abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(config.model, rngs=nnx.Rngs(0))))
    want = flat(load_params(start, config.model, abstract))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # Through the CLI: the flag sets the config key, the run says where the student starts.
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--out", str(out), "--student-init", str(start), f"data.path={dataset}",
                 "train.steps=1", "train.log_every=0"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["init_checkpoint"] == str(start)
    assert f"starts from {start}" in capsys.readouterr().out

    # A checkpoint of another architecture: one error naming the difference, nothing written.
    assert main(["train", "--config", TINY, "--out", str(tmp_path / "bad"), "--student-init",
                 str(random_checkpoint(tmp_path / "wide", config.teacher, seed=1)), f"data.path={dataset}"]) == 2
    err = capsys.readouterr().err
    assert "guidance_embeds=False (expected True)" in err and not (tmp_path / "bad").exists()


def test_only_trainable_parameters_change(dataset, tmp_path, capsys):
    # A teacher with a non-zero output layer, so that gradients reach the layers before it.
    teacher = random_checkpoint(tmp_path / "teacher", load_config(TINY).teacher, seed=2)
    config = load_config(TINY, [f"data.path={dataset}", "train.steps=3", "train.log_every=0",
                                f"train.teacher_checkpoint={teacher}",
                                "train.trainable=time_embed/*,*/norm_q/*", "train.learning_rate=1e-2"])
    _, initial, _ = create_train_state(config, make_mesh(config.mesh))
    result = train(config, tmp_path / "run", quiet=True)
    before, after = flat(initial.distill.params["student"]), flat(result.state.distill.params["student"])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert "time_embed/linear/kernel" in changed and "transformer_blocks/attn1/norm_q/weight" in changed
    assert changed <= {k for k in before if k.startswith("time_embed/") or "/norm_q/" in k}
    # The discriminator is not the product: train.trainable leaves it whole.
    d_before, d_after = (jax.tree.leaves(s.distill.params["discriminator"]) for s in (initial, result.state))
    assert any(not np.array_equal(a, b) for a, b in zip(d_before, d_after))

    assert main(["train", "--config", TINY, "--out", str(tmp_path / "typo"), f"data.path={dataset}",
                 "train.trainable=time_embbed/*"]) == 2
    assert "match no parameter" in capsys.readouterr().err


@pytest.mark.parametrize("override, complaint", [
    ("teacher.timestep_scale=1.0", "fed 1000·s"),
    ("teacher.qk_norm=None", "qk_norm"),
])
def test_a_teacher_in_the_other_convention_is_refused_with_the_fix(dataset, tmp_path, capsys, override, complaint):
    assert main(["train", "--config", TINY, "--out", str(tmp_path / "run"), f"data.path={dataset}", override]) == 2
    err = capsys.readouterr().err
    assert complaint in err and "s2flash prepare-teacher" in err and not (tmp_path / "run").exists()
