"""Weight-only int8 / int4 quantization (s2flash_jax/quantize.py, `s2flash quantize`): bounded error,
kept layers untouched, a checkpoint that round-trips and samples, a dequantized diffusers export that
diffusers runs to the same output, and a sensitivity sweep that finds a known weak layer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import SanaTransformer2DModel
from flax import nnx

from configs.tiny import STUDENT
from s2flash_jax.cli import main
from s2flash_jax.model_checkpoint import CheckpointError, load_params, read_stored_params, save_model, stored_params
from s2flash_jax.models.lora import merge_lora
from s2flash_jax.models.params import flat_params, set_flat_params
from s2flash_jax.models.sana import SanaTransformer
from s2flash_jax.models.text_encoder import FrozenTextEncoder, TextEncoderConfig, WordTokenizer
from s2flash_jax.pipeline import TextToImage
from s2flash_jax.precision import FP32
from s2flash_jax.quantize import (
    QVALUE, SCALE, QuantizationError, SweepInputs, default_keep, layer_names, layer_sensitivity,
    load_float_model, load_quantized, most_sensitive, param_bytes, plan, quantize_checkpoint, quantize_transformer,
    qvalue_dtype, relative_mse, sample, stored_form)
from tests.convert_fixtures import convert, save_transformer
from tests.sana_reference import inputs, torch_forward, torch_model
from tests.test_sana_parity import jax_forward

# qwix 0.1.8 calls nnx APIs that flax 0.12 deprecates (Module.iter_modules, VariableState, .value).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")

WORDS = ("a", "red", "blue", "circle", "square")
# The tiny student with the shapes demo's latents: 3-channel images, space-to-depth by 2.
CONFIG = dataclasses.replace(STUDENT, in_channels=12, out_channels=12)


def random_model(config=CONFIG, seed=0) -> SanaTransformer:
    """Every parameter random (no zero-initialised output layer hiding what quantization does)."""
    model = SanaTransformer(config, precision=FP32, rngs=nnx.Rngs(seed))
    params = flat_params(model)
    keys = iter(jax.random.split(jax.random.key(seed), len(params)))
    set_flat_params(model, {p: v + 0.1 * jax.random.normal(next(keys), v.shape) for p, v in params.items()})
    return model


def text_encoder() -> FrozenTextEncoder:
    tokenizer = WordTokenizer.from_vocabulary(WORDS, max_length=6)
    config = TextEncoderConfig(vocab_size=tokenizer.vocab_size, width=CONFIG.caption_channels, depth=1, num_heads=2,
                               max_length=6)
    return FrozenTextEncoder(tokenizer, config)


def save_with_components(path, model: SanaTransformer):
    """A checkpoint that samples on its own, as `s2flash demo` exports them."""
    return save_model(path, model.config, nnx.state(model, nnx.Param), metadata={
        "text_encoder": "text_encoder", "autoencoder": {"kind": "space_to_depth", "factor": 2, "scaling_factor": 1.0},
        "sampling": {"guidance_scale": 3.0, "flow_shift": 2.0}},
        write_components=lambda staging: text_encoder().save(staging / "text_encoder"))


def fixed_inputs(config=CONFIG, batch=4, seed=1) -> SweepInputs:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return SweepInputs(noise=jax.random.normal(k1, (batch, config.sample_size, config.sample_size, config.in_channels)),
                       caption=jax.random.normal(k2, (batch, 6, config.caption_channels)),
                       caption_mask=jnp.ones((batch, 6), jnp.int32), guidance_scale=4.5)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_with_components(tmp_path_factory.mktemp("src") / "model", random_model())


def test_int8_moves_samples_a_little_int4_more_through_qwix_int_weights():
    model, inp = random_model(), fixed_inputs()
    reference = sample(model, inp)
    errors, sizes = {}, {}
    for bits in (8, 4):
        quantization = plan(model.config, bits, keep=())
        quantized = quantize_transformer(model, quantization)
        qvalue = flat_params(quantized)[f"transformer_blocks/attn1/to_q/kernel/{QVALUE}"]
        assert qvalue.dtype == qvalue_dtype(bits) and qvalue.shape == (2, 64, 64)  # int4: int8 containers on CPU
        assert int(jnp.abs(qvalue.astype(jnp.int32)).max()) in {8: (127, 128), 4: (7, 8)}[bits]  # the full range
        assert flat_params(quantized)[f"transformer_blocks/attn1/to_q/kernel/{SCALE}"].shape == (2, 1, 64)
        errors[bits] = relative_mse(sample(quantized, inp), reference)
        sizes[bits] = param_bytes(stored_form(quantized, quantization))
    assert 0 < errors[8] < 5e-3 and 20 * errors[8] < errors[4] < 0.5, errors
    full = param_bytes(nnx.state(model, nnx.Param))
    assert sizes[4] < 0.7 * sizes[8] < 0.25 * full  # float32 -> int8: the kernels shrink 4x, biases and norms stay


def test_quantized_matmuls_compute_what_the_dequantized_float_model_computes():
    model, inp = random_model(), fixed_inputs()
    quantization = plan(model.config, 4, keep=("time_embed/*",))
    quantized = quantize_transformer(model, quantization)
    dequantized = nnx.clone(model)
    values = flat_params(quantized)
    set_flat_params(dequantized, {
        f"{layer}/kernel": values[f"{layer}/kernel/{QVALUE}"].astype(jnp.float32) * values[f"{layer}/kernel/{SCALE}"]
        for layer in quantization.layers})
    np.testing.assert_allclose(sample(quantized, inp), sample(dequantized, inp), rtol=1e-5, atol=1e-5)


def test_keep_patterns_name_layers_and_bad_ones_are_refused():
    names = layer_names(CONFIG)
    assert "transformer_blocks/attn1/to_q" in names and "time_embed/guidance_embedder/linear_1" in names
    assert set(plan(CONFIG, 8).layers) == set(names) - {"patch_embed/proj", "proj_out"}  # the SANA kind's quantization_keep
    kept = plan(CONFIG, 4, keep=("transformer_blocks/attn?/to_[qk]", r"re:time_embed/(timestep|guidance)_embedder/.*"))
    assert not {n for n in kept.layers if "to_q" in n or "to_k" in n or "_embedder" in n}
    assert "time_embed/linear" in kept.layers and "transformer_blocks/attn1/to_v" in kept.layers
    with pytest.raises(QuantizationError, match=r"--bits 16: expected one of \[8, 4\]"):
        plan(CONFIG, 16)
    with pytest.raises(QuantizationError, match=r"--keep 'attn1/to_q' matches no layer; layers are named .*_blocks"):
        plan(CONFIG, 8, keep=("proj_out", "attn1/to_q"))
    with pytest.raises(QuantizationError, match="keeps every layer: nothing is left to quantize"):
        plan(CONFIG, 8, keep=("*",))
    with pytest.raises(QuantizationError, match=r"--keep 're:\(' is not a valid regular expression"):
        plan(CONFIG, 8, keep=("re:(",))


def test_checkpoint_round_trip_keeps_kept_layers_bit_identical_and_samples(source, tmp_path):
    keep = ("transformer_blocks/attn1/*", "time_embed/linear")
    result = quantize_checkpoint(source, tmp_path / "q", bits=4, keep=keep)
    meta = json.loads((tmp_path / "q" / "model.json").read_text())
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["keep"] == list(keep)
    assert meta["sampling"] == {"guidance_scale": 3.0, "flow_shift": 2.0}  # the source's fields carried over
    assert (tmp_path / "q" / "text_encoder" / "tokenizer.json").is_file()  # components copied

    stored, original = stored_params(tmp_path / "q"), read_stored_params(source, list(stored_params(source)))
    quantized_kernels = {f"{layer}/kernel" for layer in result.quantization.layers}
    assert "transformer_blocks/attn2/to_q/kernel" in quantized_kernels
    assert not quantized_kernels & {"transformer_blocks/attn1/to_v/kernel", "time_embed/linear/kernel"}
    plain = [p for p in original if p not in quantized_kernels]
    assert set(plain) < set(stored) and stored[f"transformer_blocks/attn2/to_q/kernel/{QVALUE}"].dtype == jnp.int4
    for path, value in read_stored_params(tmp_path / "q", plain).items():  # kept layers, biases, norms, tables
        assert value.dtype == original[path].dtype and np.array_equal(value, original[path]), path
    assert result.bytes_after < result.bytes_before == param_bytes(original)

    inp = fixed_inputs()
    loaded = load_quantized(tmp_path / "q")
    in_memory = quantize_transformer(load_float_model(source), result.quantization)
    np.testing.assert_array_equal(sample(loaded, inp), sample(in_memory, inp))

    # It samples as any checkpoint with components does, and a float loader refuses it by name.
    prompts = ["a red circle", "a blue square"]
    images = TextToImage.load(tmp_path / "q").generate(prompts, steps=2)
    float_images = TextToImage.load(source).generate(prompts, steps=2)
    assert images.shape == float_images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert 0 < np.abs(images - float_images).mean() < 0.1
    abstract = nnx.state(nnx.eval_shape(lambda: SanaTransformer(CONFIG, rngs=nnx.Rngs(0))))
    with pytest.raises(CheckpointError, match=r"holds int4 weights .* use the checkpoint it was quantized from"):
        load_params(tmp_path / "q", CONFIG, abstract)


def test_lora_adapters_are_folded_before_quantizing(tmp_path):
    config = dataclasses.replace(CONFIG, lora_rank=2, lora_targets=("to_q", "ff.conv_point"))
    model = random_model(config, seed=3)
    save_model(tmp_path / "lora", config, nnx.state(model, nnx.Param))
    quantize_checkpoint(tmp_path / "lora", tmp_path / "q", bits=8)
    loaded = load_quantized(tmp_path / "q")
    assert loaded.config.lora_rank == 0 and not any("lora" in p for p in stored_params(tmp_path / "q"))
    merged_config, merged = merge_lora(config, nnx.state(model, nnx.Param))
    plain = SanaTransformer(merged_config, precision=FP32, rngs=nnx.Rngs(0))
    nnx.update(plain, merged)
    inp = fixed_inputs()
    in_memory = quantize_transformer(plain, plan(merged_config, 8))
    np.testing.assert_array_equal(sample(loaded, inp), sample(in_memory, inp))


def test_dequantized_export_loads_in_diffusers_and_matches_the_quantized_model(tmp_path, capsys):
    case = "sprint_guidance_qknorm"
    reference = torch_model(case)
    convert(capsys, "import", "--format", "diffusers", save_transformer(reference, tmp_path / "src"),
            "--out", tmp_path / "ckpt")
    quantize_checkpoint(tmp_path / "ckpt", tmp_path / "q", bits=4, keep=())
    code, _, err = convert(capsys, "export", tmp_path / "q", "--out", tmp_path / "diffusers")
    assert code == 0, err

    exported = SanaTransformer2DModel.from_pretrained(tmp_path / "diffusers").eval()
    inp = inputs(case)
    got, want = torch_forward(exported, inp), jax_forward(load_quantized(tmp_path / "q"), inp)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # fp32 agreement
    original = torch_forward(reference, inp)
    assert np.abs(got - original).max() > 1e-2 * np.abs(original).max()  # the int4 weights did change it
    weights = exported.state_dict()
    assert weights["transformer_blocks.0.attn1.to_q.weight"].dtype == reference.dtype  # the scale's: float32
    # int4: at most 16 distinct values per output channel (a row of torch's [out, in, 1, 1] weight).
    assert len(np.unique(weights["transformer_blocks.1.ff.conv_point.weight"][3].numpy())) <= 16


def test_sensitivity_sweep_ranks_a_layer_with_outliers_on_a_silent_input_first():
    """Row 0 of caption_projection/linear_1 gets outliers 1000x the other weights, and caption channel 0
    is zero in every input: the float model ignores the outliers, but each column's int4 scale is set
    by them, so the column's other weights round to zero. The sweep must rank that group first."""
    model, inp = random_model(seed=5), fixed_inputs(seed=6)
    kernel = flat_params(model)["caption_projection/linear_1/kernel"]
    set_flat_params(model, {"caption_projection/linear_1/kernel": kernel.at[0].set(100.0)})
    inp = dataclasses.replace(inp, caption=inp.caption.at[..., 0].set(0.0))
    groups = ("caption_projection/*", "transformer_blocks/attn1/to_q", "transformer_blocks/ff/conv_point",
              "time_embed/linear", "proj_out", "twin_time_embed/*")  # the last matches no layer: skipped
    sensitivity = layer_sensitivity(model, inp, 4, groups)
    assert list(sensitivity) == sorted(sensitivity, key=lambda g: -sensitivity[g]) and len(sensitivity) == 5
    assert most_sensitive(sensitivity, 1) == ("caption_projection/*",)
    ranked = list(sensitivity.values())
    assert ranked[0] > 10 * ranked[1], sensitivity
    assert most_sensitive(sensitivity, 2)[1] == list(sensitivity)[1]
    assert plan(model.config, 4, most_sensitive(sensitivity, 2)).keep == most_sensitive(sensitivity, 2)


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main(["quantize", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quantizes_and_names_what_is_wrong_without_writing_anything(source, tmp_path, capsys):
    code, out, err = run_cli(capsys, source, "--bits", 8, "--out", tmp_path / "q8")
    assert code == 0, err
    assert "to int8 (kept: patch_embed/*, proj_out)" in out and "wrote" in out
    assert json.loads((tmp_path / "q8" / "model.json").read_text())["quantization"]["keep"] == list(default_keep(CONFIG))
    before = sorted(p.name for p in tmp_path.iterdir())

    cases = [
        (("--bits", 3, "--out", tmp_path / "x"), "--bits 3: expected one of [8, 4]"),
        (("--bits", 4, "--keep", "proj_out", "to_qq", "--out", tmp_path / "x"), "--keep 'to_qq' matches no layer"),
        (("--bits", 4, "--out", tmp_path / "q8"), "already exists and is not empty; pass --force"),
        (("--bits", 4, "--out", source), "is the checkpoint being quantized"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, source, *args)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, tmp_path / "nothing", "--bits", 8, "--out", tmp_path / "x")
    assert code == 2 and "is not a model checkpoint: it has no model.json" in err
    code, _, err = run_cli(capsys, tmp_path / "q8", "--bits", 4, "--out", tmp_path / "x")
    assert code == 2 and "is already quantized (8-bit); quantize the checkpoint it was made from" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging left behind

    code, out, err = run_cli(capsys, source, "--bits", 4, "--keep", "--out", tmp_path / "q8", "--force")
    assert code == 0 and "to int4 (kept: none)" in out, err
    assert json.loads((tmp_path / "q8" / "model.json").read_text())["quantization"]["bits"] == 4
