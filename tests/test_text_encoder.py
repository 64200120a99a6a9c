"""The word-level tokenizer and the frozen random text encoder of the built-in demo."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models

from s2flash_jax.models.text_encoder import FrozenTextEncoder, TextEncoder, TextEncoderConfig, WordTokenizer
from s2flash_jax.outputs import OutputExists

WORDS = "a small big red green blue circle square triangle at the top bottom left right and".split()
MAX_LENGTH = 12
LONG = "a small red circle at the top left and a big blue square"  # 13 words: <bos> + 13 > 12 tokens
SHORT = "a red circle at the top left"


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.from_vocabulary(WORDS, MAX_LENGTH)


@pytest.fixture(scope="module")
def config(tokenizer) -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=MAX_LENGTH)  # width 64


@pytest.fixture(scope="module")
def encoder(tokenizer, config) -> FrozenTextEncoder:
    return FrozenTextEncoder(tokenizer, config)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_ids_and_mask_of_a_known_prompt(tokenizer):
    ids, mask = tokenizer(["A Red circle", ""])
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (2, MAX_LENGTH)
    index = {w: i + 2 for i, w in enumerate(WORDS)}  # 0 <pad>, 1 <bos>
    np.testing.assert_array_equal(ids[0], [1, index["a"], index["red"], index["circle"]] + [0] * (MAX_LENGTH - 4))
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1] + [0] * (MAX_LENGTH - 4))
    np.testing.assert_array_equal(ids[1], [1] + [0] * (MAX_LENGTH - 1))  # an empty prompt is its <bos>
    np.testing.assert_array_equal(mask[1], [1] + [0] * (MAX_LENGTH - 1))
    assert tokenizer.vocab_size == len(WORDS) + 2


def test_unknown_words_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"'purple', ','.*the vocabulary has 16 words: a, and, at, big, ") as error:
        tokenizer(["a red circle", "a purple circle, a purple square"])
    assert "'a purple circle, a purple square'" in str(error.value)


def test_too_long_prompt_is_named(tokenizer):
    tokenizer([" ".join(["a"] * (MAX_LENGTH - 1))])  # <bos> + 11 words fit exactly
    with pytest.raises(ValueError, match=f"prompt '{LONG}' is 14 tokens .* at most max_length=12"):
        tokenizer([SHORT, LONG])


def test_one_string_is_not_a_batch(tokenizer):
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        tokenizer(SHORT)


@pytest.mark.parametrize("words, needle", [
    (["red", "Red"], "'red'] appear more than once"),
    (["top-left", "red"], "'top-left'] are not single tokens"),
    (["red circle"], "are not single tokens"),
])
def test_bad_vocabulary(words, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        WordTokenizer.from_vocabulary(words, 4)


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    loaded = WordTokenizer.load(tmp_path / "tokenizer")
    assert (loaded.vocab_size, loaded.max_length) == (tokenizer.vocab_size, MAX_LENGTH)
    prompts = [SHORT, "big blue square", ""]
    for got, expected in zip(loaded(prompts), tokenizer(prompts)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="'purple'"):
        loaded(["purple"])
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        WordTokenizer.load(tmp_path / "missing")


def test_load_rejects_another_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text(Tokenizer(models.WordLevel({"<pad>": 0, "red": 1}, "[UNK]")).to_str())
    with pytest.raises(ValueError, match="not a WordTokenizer's tokenizer"):
        WordTokenizer.load(tmp_path)


def test_saving_refuses_to_overwrite_unless_forced(tokenizer, tmp_path):
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists):
        tokenizer.save(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    tokenizer.save(target, force=True)
    assert [p.name for p in target.iterdir()] == ["tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no staging folder left behind


# ---------------------------------------------------------------------------------------------
# Encoder


def test_outputs_and_padding(encoder):
    embeddings, mask = encoder([SHORT, "green"])
    assert embeddings.dtype == np.float32 and embeddings.shape == (2, MAX_LENGTH, 64)
    np.testing.assert_array_equal(mask, encoder.tokenizer([SHORT, "green"])[1])
    norms = np.linalg.norm(embeddings, axis=-1)
    np.testing.assert_array_equal(norms == 0, mask == 0)  # padding exactly zero, real tokens not
    np.testing.assert_allclose(norms[mask == 1], np.sqrt(64), rtol=1e-3)  # the final LayerNorm


def test_a_prompt_does_not_depend_on_its_batch(encoder):
    alone, _ = encoder([SHORT])
    batched, _ = encoder(["green", SHORT, "a big blue square at the bottom right"])
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-6)


def test_different_prompts_differ(encoder):
    prompts = [SHORT, "a red circle at the top right", "a blue circle at the top left", "a red square at the top left",
               "red", "blue", ""]
    embeddings, _ = encoder(prompts)
    for i in range(len(prompts)):
        for j in range(i):
            assert np.abs(embeddings[i] - embeddings[j]).max() > 0.1, (prompts[i], prompts[j])


def test_different_words_give_clearly_different_embeddings(encoder):
    embeddings, _ = encoder(WORDS)  # each word alone, at position 1
    similarity = np.array([[cosine(a, b) for b in embeddings[:, 1]] for a in embeddings[:, 1]])
    off_diagonal = similarity[~np.eye(len(WORDS), dtype=bool)]
    assert off_diagonal.max() < 0.7  # a shared <bos> and position, else unrelated


def test_word_and_position_can_be_read_back_linearly(encoder):
    """What the student's caption projection needs: from every output token a linear map fitted on
    some prompts recovers its word and its position on other prompts (random word sequences, so
    context is varied)."""
    rng = np.random.default_rng(0)

    def tokens(count):
        prompts = [" ".join(rng.choice(WORDS, rng.integers(1, MAX_LENGTH))) for _ in range(count)]
        embeddings, mask = encoder(prompts)
        ids, _ = encoder.tokenizer(prompts)
        real = mask == 1
        return np.c_[embeddings[real], np.ones(real.sum())], ids[real], np.nonzero(real)[1]

    fit_x, fit_words, fit_positions = tokens(50)
    test_x, test_words, test_positions = tokens(50)  # the same batch size: one compilation
    for fit_y, test_y, classes in ((fit_words, test_words, encoder.config.vocab_size),
                                   (fit_positions, test_positions, MAX_LENGTH)):
        probe, *_ = np.linalg.lstsq(fit_x, np.eye(classes)[fit_y], rcond=None)
        assert np.mean(np.argmax(test_x @ probe, axis=1) == test_y) > 0.97


@pytest.mark.parametrize("position, replacement", [(2, "blue"), (3, "square"), (7, "right")])
def test_changing_one_word_changes_its_position_most(encoder, position, replacement):
    words = SHORT.split()
    words[position - 1] = replacement
    embeddings, _ = encoder([SHORT, " ".join(words)])
    change = np.linalg.norm(embeddings[0] - embeddings[1], axis=-1)
    others = np.delete(change, position)
    assert change[position] > 3 * others.max() and others.max() > 0  # context does reach the other tokens


def test_padding_ids_are_ignored(encoder):
    ids, mask = encoder.tokenizer([SHORT])
    scrambled = np.where(mask == 1, ids, np.arange(MAX_LENGTH) % encoder.config.vocab_size).astype(np.int32)
    run = nnx.jit(lambda model, ids, mask: model(ids, mask))
    expected = run(encoder.encoder, ids, mask)
    np.testing.assert_array_equal(run(encoder.encoder, scrambled, mask), expected)
    np.testing.assert_allclose(encoder([SHORT])[0], expected, atol=1e-6)


def test_weights_follow_the_seed(tokenizer, config, encoder):
    again = FrozenTextEncoder(tokenizer, config)
    other_seed = FrozenTextEncoder(tokenizer, dataclasses.replace(config, seed=1))
    np.testing.assert_array_equal(again([SHORT])[0], encoder([SHORT])[0])
    assert np.abs(other_seed([SHORT])[0] - encoder([SHORT])[0]).max() > 0.1


def test_save_and_load(encoder, tmp_path):
    encoder.save(tmp_path / "text")
    prompts = [SHORT, "big blue square", ""]
    loaded = FrozenTextEncoder.load(tmp_path / "text")
    assert loaded.config == encoder.config
    for got, expected in zip(loaded(prompts), encoder(prompts)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(OutputExists):
        encoder.save(tmp_path / "text")


def test_loaded_weights_come_from_the_file_not_the_seed(encoder, tmp_path):
    """A saved model keeps its embeddings even if the code would now initialise it differently."""
    encoder.save(tmp_path / "text")
    config_file = tmp_path / "text" / "text_encoder.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "seed": 7}))
    np.testing.assert_array_equal(FrozenTextEncoder.load(tmp_path / "text")([SHORT])[0], encoder([SHORT])[0])


def test_load_rejects_weights_of_another_shape(encoder, tmp_path):
    encoder.save(tmp_path / "text")
    config_file = tmp_path / "text" / "text_encoder.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "width": 32}))
    with pytest.raises(ValueError, match=r"msgpack does not hold .*to_out/kernel is \(64, 64\), expected \(32, 32\)"):
        FrozenTextEncoder.load(tmp_path / "text")
    with pytest.raises(ValueError, match="lacks tokenizer.json, text_encoder.json, text_encoder.msgpack"):
        FrozenTextEncoder.load(tmp_path / "missing")


def test_tokenizer_and_config_must_agree(tokenizer, config):
    with pytest.raises(ValueError, match="does not fit the config"):
        FrozenTextEncoder(tokenizer, dataclasses.replace(config, max_length=MAX_LENGTH + 1))
    with pytest.raises(ValueError, match="width=30 must be even and divisible by num_heads=4"):
        TextEncoderConfig(vocab_size=10, width=30)


def test_text_encoder_checks_its_inputs(config):
    with pytest.raises(ValueError, match=r"must both be \[B, L\]"):
        TextEncoder(config, rngs=nnx.Rngs(0))(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
