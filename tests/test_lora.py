"""LoRA adapters on the SANA transformer: they start as the base model, train alone, merge into the
base weights, and export as a diffusers LoRA file that diffusers loads and runs to the same output."""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import SanaPipeline, SanaTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from flax import nnx

from conversion.lora import LORA_WEIGHTS
from conversion.sana_diffusers import sana_from_diffusers
from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import CheckpointError, check_architecture, load_params, read_model_config, save_model
from s2flash_jax.models.lora import ADAPTER_NAMES, ADAPTER_PATTERN, merge_lora
from s2flash_jax.models.params import flat_params, param_paths, set_flat_params
from s2flash_jax.models.sana import LORA_TARGETS, SanaConfig, SanaTransformer
from s2flash_jax.parallel.mesh import make_mesh
from s2flash_jax.precision import FP32
from s2flash_jax.train.state import create_train_state
from s2flash_jax.train.step import train_step
from tests.convert_fixtures import convert
from tests.sana_reference import inputs, torch_forward, torch_model
from tests.test_sana_parity import jax_forward
from tests.test_student_init import TINY, flat, random_checkpoint, tiny_batch

ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted", "ff.conv_point")


def with_adapters(base: SanaTransformer, seed: int = 7, **lora) -> SanaTransformer:
    """A model with LoRA adapters (`lora`: SanaConfig's lora_* keys) on `base`'s weights, every adapter
    random (lora_b too, so they change the output)."""
    model = SanaTransformer(dataclasses.replace(base.config, **lora), precision=FP32, rngs=nnx.Rngs(seed))
    set_flat_params(model, flat_params(base))
    adapters = {p: v for p, v in flat_params(model).items() if p.rpartition("/")[2] in ADAPTER_NAMES}
    keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
    set_flat_params(model, {p: 0.3 * jax.random.normal(next(keys), v.shape) for p, v in adapters.items()})
    return model


def adapter_paths(model: SanaTransformer) -> set[str]:
    return {p for p in param_paths(model) if p.rpartition("/")[2] in ADAPTER_NAMES}


def test_adapters_start_as_the_base_model_inside_the_stacked_blocks():
    case = "sprint_guidance_qknorm"
    base = sana_from_diffusers(torch_model(case).config, torch_model(case).state_dict(), precision=FP32)
    config = dataclasses.replace(base.config, lora_rank=3, lora_targets=("attn1.to_q", "to_v", "ff.conv_point"))
    model = SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(0))
    set_flat_params(model, flat_params(base))
    inp = inputs(case)
    np.testing.assert_array_equal(jax_forward(model, inp), jax_forward(base, inp))  # lora_b starts at zero

    paths = param_paths(model)
    width, layers = config.inner_dim, config.num_layers
    assert adapter_paths(model) == {f"transformer_blocks/{layer}/lora_{x}" for x in "ab" for layer in (
        "attn1/to_q", "attn1/to_v", "attn2/to_v", "ff/conv_point")}
    assert paths["transformer_blocks/attn1/to_q/lora_a"] == ((layers, width, 3), ("layers", "embed", "lora"))
    assert paths["transformer_blocks/attn1/to_q/lora_b"] == ((layers, 3, width), ("layers", "lora", "heads"))
    assert paths["transformer_blocks/ff/conv_point/lora_a"][1] == ("layers", "mlp", "lora")
    # PEFT's lora_A init, U(±1/√in), drawn separately for each block.
    a = np.asarray(flat_params(model)["transformer_blocks/ff/conv_point/lora_a"])
    bound = 1 / np.sqrt(config.ffn_hidden_dim)
    assert bound >= np.abs(a).max() > 0.9 * bound and not np.array_equal(a[0], a[1])


def test_lora_config_keys_are_checked_and_round_trip_through_model_json(tmp_path):
    with pytest.raises(ValueError, match=r"lora_targets \['to_query'\] name no adaptable layer") as error:
        SanaConfig(lora_rank=4, lora_targets=("to_q", "to_query"))
    assert all(name in str(error.value) for name in LORA_TARGETS)
    with pytest.raises(ValueError, match="lora_alpha=0.0 must be > 0"):
        SanaConfig(lora_rank=4, lora_alpha=0.0)
    with pytest.raises(ValueError, match="lora_rank=-1 must be >= 0"):
        SanaConfig(lora_rank=-1)
    assert SanaConfig(lora_rank=2).lora.scale == 1.0 and SanaConfig(lora_rank=2, lora_alpha=8.0).lora.scale == 4.0
    assert SanaConfig(lora_targets=("to_q",)).lora_layers == ()  # rank 0: no adapters whatever the targets
    assert SanaConfig(lora_rank=1, lora_targets=("to_out.0", "attn1.to_q")).lora_layers == (
        "attn1.to_q", "attn1.to_out.0", "attn2.to_out.0")
    assert "lora_rank" not in SanaConfig(lora_rank=4).to_diffusers()  # own keys: not exported to config.json

    # Dotted overrides reach them; model.json stores the targets as a list and reads back the same config.
    config = load_config(TINY, ["model.lora_rank=2", "model.lora_alpha=4", "model.lora_targets=to_q,ff.conv_point"])
    assert config.model.lora_targets == ("to_q", "ff.conv_point") and config.model.lora_alpha == 4.0
    model = SanaTransformer(config.model, rngs=nnx.Rngs(0))
    save_model(tmp_path / "ckpt", config.model, nnx.state(model))
    assert read_model_config(tmp_path / "ckpt") == config.model
    check_architecture(tmp_path / "ckpt", config.model)

    # A model.json written before the LoRA keys existed reads as a model without adapters.
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if not k.startswith("lora_")}
    (tmp_path / "ckpt" / "model.json").write_text(json.dumps(meta))
    assert read_model_config(tmp_path / "ckpt") == dataclasses.replace(
        config.model, lora_rank=0, lora_alpha=None, lora_targets=SanaConfig().lora_targets)


def test_training_with_the_adapter_pattern_changes_only_the_adapters(tmp_path):
    # A teacher with a non-zero output layer, so that gradients reach the blocks.
    teacher = random_checkpoint(tmp_path / "teacher", load_config(TINY).teacher, seed=2)
    config = load_config(TINY, [f"train.teacher_checkpoint={teacher}", "train.learning_rate=1e-2",
                                "model.lora_rank=2", f"model.lora_targets={','.join(ALL_TARGETS)}",
                                f"train.trainable={ADAPTER_PATTERN}"])
    recipe, state, _ = create_train_state(config, make_mesh(config.mesh))
    before = flat(state.distill.params["student"])
    # The generator phase: the sCM loss's jax.jvp and the adversarial loss run through the adapters.
    step = jax.jit(lambda st, b: train_step(recipe, 0.0, "generator", st, b))
    for i in range(3):
        state, _ = step(state, tiny_batch(i))
    after = flat(state.distill.params["student"])
    adapters = adapter_paths(nnx.eval_shape(lambda: SanaTransformer(config.model, rngs=nnx.Rngs(0))))
    assert len(adapters) == 2 * len(config.model.lora_layers) == 20
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == adapters  # every adapter trained (lora_a once lora_b left zero), nothing else moved
    for key in before.keys() - adapters:
        assert before[key].tobytes() == after[key].tobytes(), key


def test_a_model_with_adapters_starts_from_a_checkpoint_without_them(tmp_path, capsys):
    """--student-init with a plain checkpoint: its weights everywhere, fresh adapters (B = 0) beside them."""
    plain = load_config(TINY).model
    start = random_checkpoint(tmp_path / "plain", plain, seed=3)
    config = load_config(TINY, [f"train.init_checkpoint={start}", "model.lora_rank=2"])
    _, state, _ = create_train_state(config, make_mesh(config.mesh))
    got = flat(state.distill.params["student"])
    abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(plain, rngs=nnx.Rngs(0))))
    want = flat(load_params(start, plain, abstract))
    assert set(got) - set(want) == adapter_paths(nnx.eval_shape(lambda: SanaTransformer(config.model,
                                                                                        rngs=nnx.Rngs(0))))
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert all(not got[k].any() for k in got if k.endswith("lora_b"))
    # Any other difference is still refused by name.
    other = load_config(TINY, [f"train.init_checkpoint={start}", "model.lora_rank=2", "model.num_layers=3"])
    with pytest.raises(CheckpointError, match="num_layers=2 \\(expected 3\\)"):
        create_train_state(other, make_mesh(other.mesh))


def test_merged_model_computes_what_the_adapters_do():
    case = "teacher_posembed_patch2"
    reference = torch_model(case)
    base = sana_from_diffusers(reference.config, reference.state_dict(), precision=FP32)
    model = with_adapters(base, lora_rank=3, lora_alpha=5.0, lora_targets=ALL_TARGETS)
    inp = inputs(case)
    adapted, unadapted = jax_forward(model, inp), jax_forward(base, inp)
    assert np.abs(adapted - unadapted).max() > 0.05 * np.abs(unadapted).max()  # the adapters matter

    merged_config, merged_params = merge_lora(model.config, nnx.state(model))
    assert merged_config == base.config
    merged = nnx.merge(nnx.graphdef(SanaTransformer(merged_config, precision=FP32, rngs=nnx.Rngs(0))), merged_params)
    assert not adapter_paths(merged)
    got = jax_forward(merged, inp)
    assert np.abs(got - adapted).max() <= 1e-5 * np.abs(adapted).max()

    # The sCM loss's forward-mode derivative goes through the adapters and agrees with the merged model's.
    x, s, caption, mask = (jnp.asarray(v) for v in (inp.jax_x, inp.s, inp.caption, inp.mask))
    tangents = (jnp.ones_like(x), jnp.full_like(s, 0.5))
    _, dy = jax.jvp(lambda x, s: model(x, s, caption, mask), (x, s), tangents)
    _, dy_merged = jax.jvp(lambda x, s: merged(x, s, caption, mask), (x, s), tangents)
    assert np.abs(dy - dy_merged).max() <= 1e-4 * np.abs(dy).max()


@pytest.mark.parametrize("case, targets", [("sprint_guidance_qknorm", None),
                                           ("teacher_posembed_patch2", ALL_TARGETS)])
def test_exported_lora_loads_in_diffusers_and_matches_the_merged_model(case, targets, tmp_path, capsys, caplog):
    reference = torch_model(case)
    base = sana_from_diffusers(reference.config, reference.state_dict(), precision=FP32)
    model = with_adapters(base, lora_rank=4, lora_alpha=2.0, **({"lora_targets": targets} if targets else {}))
    save_model(tmp_path / "ckpt", model.config, nnx.state(model))
    code, out, err = convert(capsys, "export-lora", tmp_path / "ckpt", "--out", tmp_path / "lora")
    assert code == 0, err
    assert "rank 4" in out and [p.name for p in (tmp_path / "lora").iterdir()] == [LORA_WEIGHTS]

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=reference, scheduler=None)
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(tmp_path / "lora")
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # no missing/unexpected keys
    injected = [name for name, module in reference.named_modules() if hasattr(module, "lora_A")]
    assert len(injected) == model.config.num_layers * len(model.config.lora_layers)

    inp = inputs(case)
    with_lora, without_lora = torch_forward(reference, inp), jax_forward(base, inp)
    assert np.abs(with_lora - without_lora).max() > 0.05 * np.abs(without_lora).max()  # diffusers applied them
    merged_config, merged_params = merge_lora(model.config, nnx.state(model))
    merged = nnx.merge(nnx.graphdef(SanaTransformer(merged_config, precision=FP32, rngs=nnx.Rngs(0))), merged_params)
    assert np.abs(jax_forward(merged, inp) - with_lora).max() <= 1e-4 * np.abs(with_lora).max()

    # `convert export` of the same checkpoint writes the model with the adapters folded in.
    code, out, err = convert(capsys, "export", tmp_path / "ckpt", "--out", tmp_path / "merged")
    assert code == 0 and "merged into" in out, err
    exported = SanaTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(torch_forward(exported, inp) - with_lora).max() <= 1e-4 * np.abs(with_lora).max()


def test_export_lora_refuses_what_it_cannot_write_and_never_overwrites(tmp_path, capsys):
    config = load_config(TINY).model
    plain = save_model(tmp_path / "plain", config, nnx.state(SanaTransformer(config, rngs=nnx.Rngs(0))))
    code, _, err = convert(capsys, "export-lora", plain, "--out", tmp_path / "out")
    assert code == 2 and "has no LoRA adapters (its model.json has lora_rank=0)" in err
    assert not (tmp_path / "out").exists()

    adapted = dataclasses.replace(config, lora_rank=2)
    ckpt = save_model(tmp_path / "adapted", adapted, nnx.state(SanaTransformer(adapted, rngs=nnx.Rngs(0))))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = convert(capsys, "export-lora", ckpt, "--out", tmp_path / "out")
    assert code == 2 and "--force" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, _, _ = convert(capsys, "export-lora", ckpt, "--out", tmp_path / "out", "--force", "--dtype", "bf16")
    assert code == 0 and [p.name for p in (tmp_path / "out").iterdir()] == [LORA_WEIGHTS]
    assert not list(tmp_path.glob(".out.partial-*"))
