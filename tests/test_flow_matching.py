"""Teacher training (flow matching) through the engine, and a trained teacher feeding a distillation run
through its model checkpoint."""

import jax
import numpy as np
import pytest

from s2flash_jax.cli import main
from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import read_model_config
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.train.loop import train
from s2flash_jax.train.state import create_train_state
from tests.conftest import REPO
from tests.tiny_data import write_tiny_dataset

TINY = str(REPO / "configs/tiny.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_flow_matching_teacher_learns_and_seeds_a_distillation_run(dataset, tmp_path):
    teacher_config = load_config(f"{TINY}:teacher", [
        f"data.path={dataset}", "recipe=flow_matching", "train.optimizer=adamw", "train.learning_rate=3e-3",
        "train.clip_norm=1.0", "train.steps=40", "train.log_every=0", "train.checkpoint_every=0",
        "train.ema_decay=0.5"])
    run = train(teacher_config, tmp_path / "teacher", record_losses=True, quiet=True)
    mse = [m["flow/mse"] for m in run.losses]
    assert run.product == "model" and len(mse) == 40
    assert np.mean(mse[-10:]) < 0.8 * np.mean(mse[:10]), mse

    ckpt = run.export(teacher_config, tmp_path / "teacher_model")
    assert read_model_config(ckpt) == teacher_config.model
    exported = leaves(run.state.ema["model"])
    assert not all(np.array_equal(a, b) for a, b in zip(exported, leaves(run.state.distill.params["model"])))

    student_config = load_config(TINY, [f"data.path={dataset}", f"train.teacher_checkpoint={ckpt}"])
    _, state, _ = create_train_state(student_config, make_mesh(student_config.mesh))
    for a, b in zip(leaves(state.distill.frozen["teacher"]), exported, strict=True):
        np.testing.assert_array_equal(a, b)
    # The student starts from the loaded teacher, not from the random one.
    np.testing.assert_array_equal(np.asarray(state.distill.params["student"]["proj_out"]["kernel"]),
                                  np.asarray(run.state.ema["model"]["proj_out"]["kernel"]))

    # A checkpoint of another architecture is refused before the run directory is written.
    code = main(["train", "--config", TINY, "--out", str(tmp_path / "bad"), f"data.path={dataset}",
                 f"train.teacher_checkpoint={ckpt}", "teacher.num_layers=3", "model.num_layers=3"])
    assert code == 2 and not (tmp_path / "bad").exists()
