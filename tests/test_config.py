"""Config files, variants and dotted overrides: typed, validated, with errors that name the key."""

import pytest

from s2flash_jax.config import ConfigError, load_config


def test_overrides_are_typed_and_revalidated():
    config = load_config("configs/tiny.py", ["model.num_layers=3", "model.qk_norm=none", "sample.guidance_scale=4",
                                             "model.guidance_embeds=false", "precision.compute_dtype=bfloat16"])
    assert config.model.num_layers == 3
    assert config.model.qk_norm is None
    assert config.sample.guidance_scale == 4.0 and isinstance(config.sample.guidance_scale, float)
    assert config.model.guidance_embeds is False
    assert config.precision.compute_dtype == "bfloat16"


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=3", "unknown config key 'model.num_layer' (did you mean 'model.num_layers'?)"),
    ("model.num_layers=abc", "config key 'model.num_layers' expects int, got 'abc'"),
    ("model.num_layers=none", "config key 'model.num_layers' cannot be None"),
    ("model=3", "config key 'model' is a section"),
    ("model.num_layers.x=3", "'num_layers' is a value, not a section"),
    ("model.num_layers", "is not of the form key.sub=value"),
    ("model.num_layers=0", "num_layers=0 must be >= 1"),
    ("precision.compute_dtype=fp8", "precision.compute_dtype='fp8' is not a dtype"),
    ("sample.steps=0", "sample.steps=0 must be >= 1"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.py", [override])
    assert message in str(info.value)


def test_variants_come_from_the_argument():
    student = load_config("configs/sana_sprint.py:0.6b").model
    teacher = load_config("configs/sana_sprint.py:0.6b,teacher").model
    assert (student.inner_dim, student.num_layers) == (1152, 28)
    assert student.guidance_embeds and student.logvar_head and student.timestep_scale == 1.0
    assert not teacher.guidance_embeds and not teacher.logvar_head and teacher.timestep_scale == 0.001
    assert load_config("configs/sana_sprint.py").model.inner_dim == 2240
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['2b'\]"):
        load_config("configs/sana_sprint.py:2b")


def test_missing_or_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(tmp_path / "empty.py"))
    (tmp_path / "wrong.py").write_text("def get_config(arg=None):\n    return {}\n")
    with pytest.raises(ConfigError, match="returned dict, expected"):
        load_config(str(tmp_path / "wrong.py"))
