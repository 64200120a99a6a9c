"""Distillation health (train/health.py): the measures on analytic inputs, the warning rules, and
deliberately broken distillations that trip the warnings at the first check."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import s2flash_jax.losses.scm as scm
from s2flash_jax.config import load_config
from s2flash_jax.train.health import HealthConfig, baseline_of, high_frequency_share, sample_metrics, warnings_for
from s2flash_jax.train.loop import train
from tests.conftest import REPO
from tests.test_student_init import random_checkpoint
from tests.tiny_data import write_tiny_dataset

TINY = str(REPO / "configs/tiny.py")


def grid(size=16):
    return np.meshgrid(np.arange(size), np.arange(size), indexing="ij")


def test_high_frequency_share_of_analytic_images():
    i, j = grid()
    smooth = np.cos(2 * np.pi * i / 16) + np.sin(2 * np.pi * 2 * j / 16)  # radii 1/16 and 2/16 < 0.25
    checker = (-1.0) ** (i + j)  # the Nyquist corner, radius 0.71
    as_batch = lambda x: jnp.asarray(x, jnp.float32)[None, :, :, None]  # noqa: E731
    assert float(high_frequency_share(as_batch(smooth))) < 1e-6
    np.testing.assert_allclose(float(high_frequency_share(as_batch(checker))), 1.0, rtol=1e-6)
    # The cosine carries half the checkerboard's power, so 2/3 of the sum is high; a constant is ignored.
    mixed = np.cos(2 * np.pi * i / 16) + checker + 3.0
    np.testing.assert_allclose(float(high_frequency_share(as_batch(mixed))), 2 / 3, rtol=1e-5)


def test_sample_metrics_against_the_solution():
    rng = np.random.default_rng(0)
    i, j = grid()
    solution = jnp.asarray(np.stack([np.cos(2 * np.pi * (i + k) / 16) for k in range(4)])[..., None], jnp.float32)
    solution = solution + 0.1 * jnp.asarray(rng.standard_normal(solution.shape), jnp.float32)
    exact = sample_metrics({1: solution}, solution)
    assert float(exact["health/latent_mse/1step"]) == 0.0
    np.testing.assert_allclose(float(exact["health/hf_ratio/1step"]), 1.0, rtol=1e-6)
    noisy = solution + jnp.asarray(rng.standard_normal(solution.shape), jnp.float32)
    metrics = sample_metrics({2: noisy}, solution)
    np.testing.assert_allclose(float(metrics["health/latent_mse/2step"]), np.mean((noisy - solution) ** 2), rtol=1e-6)
    peak = float(solution.max() - solution.min())
    np.testing.assert_allclose(float(metrics["health/psnr/2step"]),
                               20 * np.log10(peak) - 10 * np.log10(float(metrics["health/latent_mse/2step"])),
                               rtol=1e-5)
    assert float(metrics["health/hf_ratio/2step"]) > 2.0  # white noise puts ~80% of its power above radius 0.25


def test_each_rule_names_what_went_wrong():
    config = HealthConfig(every=10)
    start = {"step": 0, "health/latent_mse/1step": 0.1, "health/param_change": 0.0, "health/hf_ratio/1step": 1.0}
    fine = {"step": 10, "health/latent_mse/1step": 0.12, "health/param_change": 1e-4, "health/hf_ratio/1step": 1.2,
            "scm/tangent_norm": 1.0}
    assert warnings_for(fine, baseline_of([start, fine]), config) == []
    later = [fine, {"step": 20, "health/latent_mse/1step": 0.2, "health/param_change": 1e-4,
                    "health/hf_ratio/4step": 2.5, "scm/tangent_norm": 11.0}]
    problems = warnings_for(later[-1], baseline_of([start, *later]), config)
    assert len(problems) == 3
    assert "moving away from the teacher's ODE solution" in problems[0] and "0.2 at step 20" in problems[0]
    assert "4-step samples carry 2.5x" in problems[1]
    assert "tangent norm grew from 1 to 11" in problems[2]
    frozen = {"step": 10, "health/param_change": 0.0, "health/latent_mse/1step": 0.1}
    assert "hardly changed" in warnings_for(frozen, baseline_of([start, frozen]), config)[0]
    broken = {"step": 10, "health/latent_mse/1step": float("nan"), "health/param_change": 1e-4}
    assert "health/latent_mse/1step is nan at step 10" in warnings_for(broken, baseline_of([start, broken]), config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny dataset and a teacher with random weights everywhere (no zero output layer)."""
    root = tmp_path_factory.mktemp("health")
    data = write_tiny_dataset(root / "data")
    return data, random_checkpoint(root / "teacher", load_config(TINY).teacher, seed=4)


def health_run(runs, out, *overrides):
    data, teacher = runs
    config = load_config(TINY, [f"data.path={data}", f"train.teacher_checkpoint={teacher}", "train.steps=6",
                                "train.log_every=0", "train.checkpoint_every=0", "train.optimizer=adamw",
                                "train.learning_rate=3e-3", "health.every=6", "health.prompts=8", *overrides])
    return train(config, out)


def test_a_healthy_run_logs_its_checks_and_does_not_warn(runs, tmp_path, capsys):
    result = health_run(runs, tmp_path / "run")
    assert [c["step"] for c in result.health] == [0, 6]
    assert all(c["warnings"] == [] for c in result.health)
    assert "health warning" not in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "health.json").read_text())
    assert saved == json.loads(json.dumps(result.health))
    first, last = result.health
    assert first["health/param_change"] == 0.0 and last["health/param_change"] > 1e-6
    assert "scm/tangent_norm" in last and "scm/tangent_norm" not in first  # measured by the first update
    assert {f"health/psnr/{n}step" for n in (1, 2, 4)} <= set(first)


def test_a_learning_rate_too_small_to_move_the_weights_warns_at_the_first_check(runs, tmp_path, capsys):
    result = health_run(runs, tmp_path / "run", "train.learning_rate=1e-30")
    assert any("hardly changed" in w for w in result.health[-1]["warnings"])
    assert "health warning: the trained network has hardly changed" in capsys.readouterr().err


def test_a_flipped_teacher_velocity_warns_at_the_first_check(runs, tmp_path, capsys, monkeypatch):
    """The sign slip of mixing v = ε − x0 with x0 − ε: sCM then trains the student against the
    teacher's flow, and its samples leave the teacher's ODE solution."""
    guided = scm.classifier_free_guidance
    monkeypatch.setattr(scm, "classifier_free_guidance", lambda *args: -guided(*args))
    result = health_run(runs, tmp_path / "run")
    assert any("moving away from the teacher's ODE solution" in w for w in result.health[-1]["warnings"])
    assert "health warning: 1-step samples are moving away" in capsys.readouterr().err
