"""Gemma-2 in JAX against transformers' Gemma2Model, SANA's caption path against precompute's torch
one, and the torch-free loader on folders transformers wrote (no downloads)."""

import dataclasses
import json
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversion.errors import ConversionError
from conversion.gemma2 import load_caption_encoder, load_gemma2, read_gemma2_config
from s2flash_jax.data.captions import CaptionTruncatedWarning, FastTokenizer, tokenize_captions
from s2flash_jax.data.precompute import embed_captions
from s2flash_jax.models.gemma2 import Gemma2Config, Gemma2Model
from s2flash_jax.models.params import param_paths
from s2flash_jax.parallel.axes import LOGICAL_AXIS_RULES
from s2flash_jax.precision import FP32, Precision
from tests.test_precompute import CAPTIONS, HIDDEN, models  # noqa: F401 - the tiny Gemma-2 + tokenizer fixture

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LENGTH = 11
# Right padding as SANA pads: full, half, and a row whose padded tail lies past the sliding window
# of its last real token (its sliding-layer rows see no key at all).
MASK = np.array([[1] * LENGTH, [1] * 6 + [0] * 5, [1] * 2 + [0] * 9])
# Small enough that the window, the cap and the grouped heads all change the result.
SLIDING = dict(vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=3, attn_logit_softcapping=5.0,
               query_pre_attn_scalar=24, attention_bias=True,
               rope_parameters={"rope_type": "default", "rope_theta": 100.0},
               layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"])
PLAIN = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, attn_logit_softcapping=None, hidden_activation="gelu",
             tie_word_embeddings=False)
CHI = "describe : user prompt :"


def random_gemma(overrides: dict, causal_lm: bool = False, seed: int = 0):
    """A transformers Gemma-2 with every parameter random (norm weights too, not init's zeros)."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(**overrides)
    model = (transformers.Gemma2ForCausalLM if causal_lm else transformers.Gemma2Model)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def forward(model: Gemma2Model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    graphdef, params = nnx.split(model)
    return np.asarray(jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))(params, ids, mask))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, folder): a Gemma2Model in one file; a Gemma2ForCausalLM (keys
    `model.…`, an untied lm_head) in several shards with an index."""
    root = tmp_path_factory.mktemp("gemma2")
    sliding = random_gemma(SLIDING)
    sliding.save_pretrained(root / "sliding")
    plain = random_gemma(PLAIN, causal_lm=True, seed=1)
    plain.save_pretrained(root / "plain", max_shard_size="40KB")
    return {"sliding": (sliding, root / "sliding"), "plain": (plain.model, root / "plain")}


@pytest.mark.parametrize("name", ["sliding", "plain"])
def test_last_hidden_state_matches_transformers_at_every_position(checkpoints, name):
    reference, folder = checkpoints[name]
    ids = np.random.default_rng(0).integers(0, 40, MASK.shape)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK)).last_hidden_state.numpy()
    got = forward(load_gemma2(folder), ids, MASK)
    assert got.shape == (3, LENGTH, reference.config.hidden_size) and got.dtype == np.float32
    # Padded positions too: transformers defines them (causal attention to the real tokens; rows that
    # see nothing average all values), and SANA's kept positions include them.
    assert relative_error(got, want) <= 1e-4
    if name == "sliding":
        # bf16 runs (norms, logits and softmax stay float32), to bf16 accuracy.
        low = forward(load_gemma2(folder, precision=Precision("bfloat16", "bfloat16")), ids, MASK)
        assert low.dtype == jnp.bfloat16 and relative_error(low.astype(np.float32), want) <= 5e-2
        # The window and the cap are not idle in this config: without them transformers differs.
        for change in (dict(sliding_window=LENGTH), dict(attn_logit_softcapping=None)):
            other = random_gemma({**SLIDING, **change})
            with torch.no_grad():
                changed = other(torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK)).last_hidden_state
            assert relative_error(changed.numpy(), want) > 1e-2, change


def test_causal_lm_folder_is_sharded_with_model_prefix_and_its_lm_head_ignored(checkpoints):
    folder = checkpoints["plain"][1]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and "lm_head.weight" in weight_map
    assert all(k.startswith("model.") for k in weight_map if k != "lm_head.weight")
    assert load_gemma2(folder).config.hidden_activation == "gelu"


def test_parameters_carry_known_logical_axes():
    model = nnx.eval_shape(lambda: Gemma2Model(Gemma2Config(), precision=FP32, rngs=nnx.Rngs(0)))
    known = dict(LOGICAL_AXIS_RULES)
    paths = param_paths(model)
    for path, (shape, names) in paths.items():
        assert names is not None and len(names) == len(shape) and all(n in known for n in names), (path, names)
    assert paths["embed_tokens/embedding"] == ((256000, 2304), ("vocab", "embed"))
    assert paths["layers/self_attn/k_proj/kernel"] == ((26, 2304, 1024), ("layers", "embed", "kv_heads"))
    n = sum(int(np.prod(shape)) for shape, _ in paths.values())
    assert n == 2_614_341_888  # Gemma-2-2B without its (tied) LM head


def test_caption_encoder_matches_embed_captions(models, tmp_path):
    """Same tokens, same kept positions, same hidden states as precompute's torch path; loaded from a
    folder with both model and tokenizer, and from a pipeline folder with text_encoder/ + tokenizer/."""
    folder = models[1]
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "text_encoder")
    shutil.copytree(folder, pipeline / "tokenizer")
    (pipeline / "model_index.json").write_text("{}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch_model = transformers.AutoModel.from_pretrained(folder).eval()
    for source, chi in ((folder, None), (pipeline, CHI)):
        encoder = load_caption_encoder(source, caption_length=12, chi_prompt=chi)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptionTruncatedWarning)  # nothing is cut at this length
            got, got_mask = encoder(CAPTIONS)
            want, want_mask = embed_captions(tokenizer, torch_model, CAPTIONS, 12, chi, "cpu")
        assert got.shape == (len(CAPTIONS), 12, HIDDEN) and got.dtype == np.float32
        np.testing.assert_array_equal(got_mask, want_mask)
        assert got_mask.dtype == want_mask.dtype == np.int64
        assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("chi", [None, CHI])
def test_a_too_long_caption_is_cut_with_a_warning(models, chi):
    long = "small red square right of a big blue circle on the left of the green square"  # 16 words, 76 characters
    head = "small red square" if chi is None else "small red"  # what fits: <bos> + 3 words, or chi's 6 tokens + 2
    limit = 4 if chi is None else 8  # with the chi prompt: its 6 tokens + caption_length - 2
    encoder = load_caption_encoder(models[1], caption_length=4, chi_prompt=chi)
    with pytest.warns(CaptionTruncatedWarning) as caught:
        got, mask = encoder([long, head])
    assert len(caught) == 1  # the long caption only
    message = str(caught[0].message)
    assert f"caption '{long[:57]}...' has {17 if chi is None else 22} tokens" in message
    assert f"more than the {limit} the text encoder reads (caption_length=4)" in message
    assert ("with the complex human instruction" in message) == (chi is not None)
    # Truncation keeps the head of the prompt: the long caption reads as its first words.
    np.testing.assert_array_equal(mask, 1)
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=1e-6)

    torch_model = transformers.AutoModel.from_pretrained(models[1]).eval()
    with pytest.warns(CaptionTruncatedWarning, match="more than the"):
        want, want_mask = embed_captions(encoder.tokenizer, torch_model, [long], 4, chi, "cpu")
    np.testing.assert_array_equal(mask[:1], want_mask)
    assert relative_error(got[:1], want) <= 1e-4


def test_fast_tokenizer_tokenizes_as_transformers(tmp_path):
    """The torch-free tokenizer (tokenizer.json through the `tokenizers` library) gives transformers' tokens
    for a Gemma tokenizer (BPE, byte fallback, spaces as ▁; transformers 5 rebuilds its pipeline in
    Python) with Gemma's <bos> post-processor, with and without the chi prompt, cut and padded; like
    transformers, it ignores tokenizer_config.json's add_bos_token / add_eos_token."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab |= {f"<0x{i:02X}>": len(vocab) + i for i in range(256)}
    merges = [("▁", "a"), ("r", "e"), ("▁", "re"), ("▁re", "d")]
    for piece in [*"abcdefghijklmnopqrstuvwxyz▁.,:'-", *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    transformers.GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {  # as in google/gemma-2-2b's tokenizer.json
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    texts = ["A red circle", "  the red ÿ café  ", "", "re re red\n\tthe " * 5, "日本"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for flags in ({}, {"add_bos_token": False, "add_eos_token": True}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        reference, fast = transformers.AutoTokenizer.from_pretrained(tmp_path), FastTokenizer.from_folder(tmp_path)
        for chi in (None, CHI):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CaptionTruncatedWarning)
                want, got = (tokenize_captions(t, texts, 6, chi) for t in (reference, fast))
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.attention_mask, want.attention_mask)
            assert (got.input_ids[:, 0] == 2).all() and got.attention_mask[2, -1] == 0  # <bos>; "" is padded
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    with pytest.raises(ValueError, match="names no pad_token"):
        FastTokenizer.from_folder(tmp_path)


def test_tokenize_captions_refuses_what_sana_cannot_encode(models):
    tokenizer = transformers.AutoTokenizer.from_pretrained(models[1])
    tokens = tokenize_captions(tokenizer, ["a red circle"], 6, CHI)
    assert tokens.input_ids.shape == (1, 6 + 6 - 2) and tokens.keep == (0, 5, 6, 7, 8, 9)
    with pytest.raises(ValueError, match="a sequence of strings, got one str"):
        tokenize_captions(tokenizer, "a red circle", 6, None)
    with pytest.raises(ValueError, match="caption_length=0 must be >= 1"):
        tokenize_captions(tokenizer, ["a"], 0, None)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):  # only its <bos>: no room for the kept token 0
        tokenize_captions(tokenizer, ["a"], 6, " ")


def test_bad_checkpoints_are_one_conversion_error_naming_the_keys(checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints["sliding"][1], folder)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    tensors["norm.weight"] = torch.zeros(47)
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as error:
        load_gemma2(folder)
    message = str(error.value)
    assert "\n" not in message
    for part in ("1 missing keys (layers.1.mlp.up_proj.weight: expected (64, 48))",
                 "1 unexpected keys (layers.9.mlp.up_proj.weight: found (3,))",
                 "1 wrong shapes (norm.weight: expected (48,), found (47,))"):
        assert part in message

    config = json.loads((folder / "config.json").read_text())
    for change, expected in ((dict(model_type="llama"), "model_type='llama': expected a 'gemma2' config"),
                             (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
                             (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True is not"),
                             (dict(layer_types=["sliding_attention", "chunked_attention"]),
                              "layer_types ['chunked_attention'] are not supported"),
                             (dict(hidden_activation="silu"), "hidden_activation='silu' is not supported")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match="config.json: .*" + re.escape(expected)):
            read_gemma2_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="has no config.json; expected a transformers Gemma-2 folder"):
        load_gemma2(folder)


def test_config_defaults_are_gemma_2_2b_and_bad_values_are_named():
    config = Gemma2Config()
    assert config.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert len(config.layer_types) == 26 and config.sliding_layers.sum() == 13
    assert Gemma2Config.from_transformers({"rope_theta": 500.0, "layer_types": None}).rope_theta == 500.0
    with pytest.raises(ValueError, match="num_attention_heads=6 must be a multiple of num_key_value_heads=4; "
                                         "layer_types has 2 entries for num_hidden_layers=26"):
        dataclasses.replace(config, num_attention_heads=6, layer_types=("full_attention",) * 2)
    with pytest.raises(ValueError, match="sliding_window=None must be >= 1"):
        Gemma2Config(sliding_window=None)
    assert Gemma2Config(sliding_window=None, layer_types=("full_attention",) * 26).sliding_window is None
    with pytest.raises(ValueError, match=r"input_ids \(2, 3\) and attention_mask \(2, 4\) must both be \[B, L\]"):
        nnx.eval_shape(lambda: Gemma2Model(Gemma2Config(num_hidden_layers=1, layer_types=None), rngs=nnx.Rngs(0)))(
            jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
