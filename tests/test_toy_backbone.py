"""A second backbone through the whole engine (issue: any backbone, step 1): the test-only toy
denoiser (tests/toy_backbone.py) trains with flow matching and resumes bit for bit, is distilled by
SANA-Sprint's sCM (LADD refused: it has no block features), samples in 1/2/4 steps, passes the
health checks and exports a checkpoint that records its kind."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.config import Config, ConfigError, SampleConfig, TrainConfig
from s2flash_jax.data.pipeline import DataConfig
from s2flash_jax.model_checkpoint import read_model_config
from s2flash_jax.models.backbone import abstract_backbone
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig
from s2flash_jax.recipes.sd35_flash import SD35FlashConfig
from s2flash_jax.sampling import few_step_sample
from s2flash_jax.train.health import HealthConfig
from s2flash_jax.train.loop import train
from s2flash_jax.train.state import create_train_state
from tests.tiny_data import write_tiny_dataset
from tests.toy_backbone import ToyConfig

TEACHER = ToyConfig()
STUDENT = dataclasses.replace(TEACHER, guidance_embeds=True, logvar_head=True)
RUN = TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, optimizer="adamw", log_every=0, checkpoint_every=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def toy_config(dataset, **sections) -> Config:
    return Config(**{"model": TEACHER, "recipe": "flow_matching", "train": RUN,
                     "data": DataConfig(path=dataset, caption_length=8),
                     "sample": SampleConfig(steps=2, batch_size=2, height=8, width=8), **sections})


def test_flow_matching_trains_resumes_checks_and_exports_the_toy(dataset, tmp_path):
    config = toy_config(dataset, health=HealthConfig(every=2, prompts=2, teacher_steps=2))
    whole = train(config, tmp_path / "whole", record_losses=True, quiet=True)
    train(config, tmp_path / "split", record_losses=True, quiet=True, stop_after=2)
    rest = train(config, tmp_path / "split", resume=True, record_losses=True, quiet=True)
    assert [m["flow/loss"] for m in whole.losses[2:]] == [m["flow/loss"] for m in rest.losses]
    assert whole.losses[-1]["flow/loss"] < whole.losses[0]["flow/loss"]
    assert [h["step"] for h in whole.health] == [0, 2, 4]
    assert whole.health[0]["health/param_change"] == 0 < whole.health[1]["health/param_change"]
    export = whole.export(config, tmp_path / "model")
    assert json.loads((export / "model.json").read_text())["model"]["kind"] == "toy"
    assert read_model_config(export) == TEACHER


def test_scm_distils_the_toy_and_the_new_student_starts_as_its_teacher(dataset, tmp_path):
    config = toy_config(dataset, recipe="sana_sprint", model=STUDENT, teacher=TEACHER,
                        train=dataclasses.replace(RUN, teacher_checkpoint="random"),
                        sana_sprint=SanaSprintConfig(cycle=("generator",)),
                        health=HealthConfig(every=2, prompts=2, teacher_steps=2))
    recipe, state, _ = create_train_state(config, make_mesh(config.mesh))
    assert recipe.trains == ("student",)
    student = nnx.merge(nnx.graphdef(abstract_backbone(STUDENT)), state.distill.params["student"])
    # The teacher's output layer is zero-initialised: give both a non-zero one so the comparison means something.
    kernel = jax.random.normal(jax.random.key(1), student.pixel_out.kernel.shape)
    teacher = nnx.merge(nnx.graphdef(abstract_backbone(TEACHER)), state.distill.frozen["teacher"])
    student.pixel_out.kernel[...] = kernel
    teacher.pixel_out.kernel[...] = kernel
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    caption, s = jax.random.normal(jax.random.key(3), (2, 8, 32)), jnp.array([0.2, 0.9])
    np.testing.assert_array_equal(np.asarray(student(x, s, caption, None, jnp.array([0.45, 0.7]))),
                                  np.asarray(teacher(x, s, caption)))
    result = train(config, tmp_path / "run", record_losses=True, quiet=True)
    assert all(np.isfinite(m["generator/loss"]) for m in result.losses)
    # the health checks compare the student's samples with the teacher's ODE solution
    assert [h["step"] for h in result.health] == [0, 2, 4]
    assert all(np.isfinite(h[f"health/latent_mse/{n}step"]) for h in result.health for n in (1, 2, 4))
    model = nnx.merge(nnx.graphdef(abstract_backbone(STUDENT)), result.state.distill.params["student"])
    noise = jax.random.normal(jax.random.key(4), (2, 8, 8, 4))
    for steps in (1, 2, 4):
        latents = few_step_sample(model, noise, caption, None, jax.random.key(5), steps=steps, guidance_scale=4.5)
        assert latents.shape == noise.shape and bool(jnp.isfinite(latents).all())


@pytest.mark.parametrize("recipe, message", [
    ("sana_sprint", "SANA-Sprint's LADD needs the teacher's block features, which a toy backbone does not have; "
                    "set sana_sprint.cycle=generator"),
    ("s2flash", "S2-Flash's discriminator needs the teacher's block features"),
    ("sd35_flash", "SD3.5-Flash's stage-2 adversary needs the teacher's block features, which a toy backbone does "
                   "not have; set sd35_flash.adversarial_weight=0"),
])
def test_an_adversary_on_a_backbone_without_block_features_is_refused(dataset, recipe, message):
    config = toy_config(dataset, recipe=recipe, model=STUDENT, teacher=TEACHER,
                        train=dataclasses.replace(RUN, teacher_checkpoint="random"),
                        sd35_flash=SD35FlashConfig(adversarial_weight=0.5))
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_train_state(config, make_mesh(config.mesh))
