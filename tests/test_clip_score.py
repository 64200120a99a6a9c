"""The JAX CLIP against transformers' CLIPModel on tiny random CLIPs saved as transformers folders:
tokens, pixels, both embeddings and the CLIP score; and the loader's errors."""

import json
import shutil

import numpy as np
import pytest

from conversion.clip import load_clip_scorer
from conversion.errors import ConversionError
from s2flash_jax.eval.clip import clip_score

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MAX_LENGTH = 16  # short, so that a long prompt is truncated
PROMPTS = ["a red circle", "Two  BLUE squares, top-left!", "", "a green triangle at the bottom right of a large "
           "white field with many other shapes around it"]


def tiny_tokenizer():
    """A CLIP tokenizer over the byte-level alphabet (every character a token, with and without the
    end-of-word suffix) and a couple of merges; the end token is the highest id, as in OpenAI's."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("r", "e"), ("re", "d</w>")])


def tiny_reference(hidden_act: str, legacy_eos: bool, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    eos = 2 if legacy_eos else vocab_size - 1
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act=hidden_act,
                         eos_token_id=eos),
        vision_config=dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # no ones / zeros left from initialisation, norms included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[("quick_gelu", True), ("gelu", False)], ids=["openai-legacy-eos", "gelu"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer()
    model = tiny_reference(*request.param, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model, tokenizer


def test_clip_score_matches_transformers(saved):
    folder, reference, tokenizer = saved
    scorer = load_clip_scorer(folder, batch_size=3)  # 4 pairs: a full batch and a padded one
    images = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 40, 57, 3), dtype=np.uint8)

    ids, mask = scorer.tokenize(PROMPTS)
    expected = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids[3, -1] == tokenizer.eos_token_id  # truncated, keeping the end token

    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]  # [N, 3, 32, 32]
    np.testing.assert_allclose(scorer.pixels(images), pixels.transpose(0, 2, 3, 1), atol=1e-6)

    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                        pixel_values=torch.from_numpy(pixels))
        text = reference.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long()).pooler_output.numpy()
        image = reference.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    model = scorer.model
    got_text = np.asarray(model.text_embeds(ids, mask))
    got_image = np.asarray(model.image_embeds(scorer.pixels(images)))
    assert np.abs(got_text - text).max() <= 1e-5 * np.abs(text).max()
    assert np.abs(got_image - image).max() <= 1e-5 * np.abs(image).max()

    cosine = (out.image_embeds * out.text_embeds).sum(-1).numpy()  # transformers normalises both
    np.testing.assert_allclose(scorer(images, PROMPTS), 100 * np.maximum(cosine, 0), atol=1e-4)


def test_clip_score_is_100_cosine_clamped_at_zero():
    a = np.array([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]], np.float32)
    b = np.array([[6.0, 8.0], [-1.0, 0.0], [0.0, 2.0]], np.float32)
    np.testing.assert_allclose(np.asarray(clip_score(a, b)), [100.0, 0.0, 100 / np.sqrt(2)], rtol=1e-6)


def test_float_images_are_quantised_as_a_png_would_be(saved):
    folder, _, _ = saved
    scorer = load_clip_scorer(folder)
    floats = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    as_png = (floats * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(scorer(floats, PROMPTS[:2]), scorer(as_png, PROMPTS[:2]))


@pytest.mark.parametrize("problem", ["missing folder", "no tokenizer", "missing tensor", "not clip", "bad resample",
                                     "wrong crop"])
def test_bad_folder_is_one_error_naming_it(saved, problem, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(saved[0], tmp_path / "clip")
    if problem == "missing folder":
        folder, message = tmp_path / "nowhere", r"'.*nowhere' does not exist; expected a transformers CLIP folder"
    elif problem == "no tokenizer":
        (folder / "tokenizer.json").unlink()
        message = r"has no tokenizer.json"
    elif problem == "missing tensor":
        tensors = load_file(folder / "model.safetensors")
        del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        message = r"1 missing keys \(vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
    elif problem == "not clip":
        (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
        message = r"model_type='siglip': expected a 'clip' config"
    elif problem == "bad resample":
        config = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
        message = r"resample=2 is not supported"
    else:  # OpenAI's 224 px crop beside a 32 px vision tower
        config = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"shortest_edge": 224},
                                                                     "crop_size": {"height": 224, "width": 224}}))
        message = r"crop_size 224 \(after resizing to 224\) does not fit the vision tower's 32x32 input"
    with pytest.raises(ConversionError, match=message):
        load_clip_scorer(folder)


def test_a_folder_without_image_processor_settings_crops_to_the_vision_tower(saved, tmp_path):
    """CLIPImageProcessor's defaults (bicubic, OpenAI's mean and std) at the tower's own input size."""
    folder = shutil.copytree(saved[0], tmp_path / "clip")
    (folder / "preprocessor_config.json").unlink()
    preprocessing = load_clip_scorer(folder).preprocessing
    assert (preprocessing.size, preprocessing.crop_size) == (32, 32)
    assert preprocessing.mean == transformers.CLIPImageProcessorPil().image_mean
