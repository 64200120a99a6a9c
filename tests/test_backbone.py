"""The Backbone protocol and the model-kind registry: SANA is one kind among any, and the kind is
recorded wherever an architecture is stored (model.json, a run's config.json); files written before
kinds were recorded read as SANA."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.config import ConfigError, config_from_json, config_to_json, load_config
from s2flash_jax.model_checkpoint import CheckpointError, load_params, read_model_config, save_model
from s2flash_jax.models.backbone import (
    CAPABILITIES, Backbone, abstract_backbone, architecture_from_json, architecture_to_json, backbone_kind,
    build_backbone, kind_of)
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from tests.conftest import REPO

TINY = load_config(f"{REPO}/configs/tiny.py").model


def test_sana_is_a_backbone_of_kind_sana():
    kind = backbone_kind("sana")
    assert kind_of(TINY) is kind and kind.config_class is SanaConfig and kind.module is SanaTransformer
    assert set(kind.capabilities) == set(CAPABILITIES)
    model = build_backbone(TINY, rngs=nnx.Rngs(0))
    assert isinstance(model, Backbone) and isinstance(model, SanaTransformer)
    # abstract_backbone allocates nothing and has the built model's parameter shapes
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract_backbone(TINY), nnx.Param))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract_backbone(TINY))))
    x, s, caption = np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32), np.zeros((1, 8, 32), np.float32)
    with pytest.raises(ValueError, match="SANA takes no pooled text embeddings"):
        model(x, s, caption, None, np.ones((1,), np.float32), pooled=np.ones((1, 16), np.float32))


def test_an_unknown_kind_or_config_class_names_the_known_ones():
    with pytest.raises(ValueError, match=r"model kind 'mmdit' is unknown; expected one of \['sana'"):
        backbone_kind("mmdit")
    with pytest.raises(TypeError, match="dict is the config of no registered backbone"):
        kind_of({"in_channels": 4})


def test_model_json_records_the_kind_and_an_older_one_reads_as_sana(tmp_path):
    model = build_backbone(TINY, rngs=nnx.Rngs(3))
    path = save_model(tmp_path / "ckpt", TINY, nnx.state(model, nnx.Param))
    meta = json.loads((path / "model.json").read_text())
    assert meta["model"]["kind"] == "sana" and read_model_config(path) == TINY
    meta["model"].pop("kind")  # as every model.json written before kinds were recorded
    (path / "model.json").write_text(json.dumps(meta))
    assert read_model_config(path) == TINY
    params = load_params(path, TINY, nnx.state(abstract_backbone(TINY), nnx.Param))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta["model"]["kind"] = "mmdit"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model config cannot be used: model kind 'mmdit' is unknown"):
        read_model_config(path)


def test_architecture_json_round_trips():
    data = architecture_to_json(TINY)
    assert data["kind"] == "sana" and architecture_from_json(json.loads(json.dumps(data))) == TINY
    with pytest.raises(TypeError, match="should be a JSON object"):
        architecture_from_json([1, 2])


def test_run_config_json_records_kinds_and_an_older_one_reads():
    config = load_config(f"{REPO}/configs/tiny.py")
    data = config_to_json(config)
    assert (data["model"]["kind"], data["teacher"]["kind"]) == ("sana", "sana")
    assert config_from_json(json.loads(json.dumps(data))) == config
    for key in ("model", "teacher"):
        data[key].pop("kind")
    assert config_from_json(data) == config
    data["model"]["kind"] = "mmdit"
    with pytest.raises(ConfigError, match="model kind 'mmdit' is unknown"):
        config_from_json(data)
