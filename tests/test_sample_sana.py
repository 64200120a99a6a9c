"""`s2flash sample --ckpt --text-encoder --vae`: a converted SANA-Sprint student with SANA's Gemma-2 and
DC-AE in JAX gives diffusers' SanaSprintPipeline's image for the same prompt and noise; the command
writes it (batched, padded, on two devices too, without torch), and refuses bad input in one line.

The pipeline is test_convert_pipeline's tiny random SanaSprintPipeline (DC-AE f2, 1-layer Gemma-2,
word-level tokenizer), its transformer imported with `s2flash convert import`; SanaSprintPipeline's
defaults throughout (guidance 4.5, 300-token captions with the complex human instruction) except
its 2-step intermediate time 1.3, which our sampler does not use (uniform TrigFlow times).
"""

import json
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import diffusers.schedulers.scheduling_scm as scheduling_scm
from conversion.dc_ae import load_dc_ae
from conversion.gemma2 import load_caption_encoder
from diffusers import SanaSprintPipeline
from s2flash_jax.cli import main
from s2flash_jax.data.captions import CaptionTruncatedWarning
from s2flash_jax.pipeline import TextToImage, batch_key
from s2flash_jax.precision import FP32
from tests.conftest import REPO, fake_devices_env
from tests.test_convert_pipeline import exported, teacher_pipeline  # noqa: F401 - the tiny pipeline fixtures

# Upper case and outer spaces: diffusers lowercases and strips prompts when sampling (the vocabulary is lower case).
PROMPTS = ["  A Red circle on the LEFT ", "blue square"]
LONG = " ".join(["red"] * 320)  # more than the 300 caption tokens
# float32 on both sides: images (in [0, 1]) agree to ~5e-7 (measured); the rest is room for other CPUs.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pipeline(exported):  # noqa: F811
    ckpt, sprint = exported
    return TextToImage.load(ckpt, text_encoder=load_caption_encoder(sprint, precision=FP32, lowercase=True),
                            autoencoder=load_dc_ae(sprint, precision=FP32))


@pytest.fixture(scope="module")
def two_step_images(pipeline):
    return pipeline.generate(PROMPTS, steps=2, seed=0, batch_size=2)


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("steps", [1, 2])
def test_same_image_as_sana_sprint_pipeline(exported, pipeline, two_step_images, steps, monkeypatch):  # noqa: F811
    _, sprint = exported
    got = two_step_images if steps == 2 else pipeline.generate(PROMPTS, steps=1, seed=0, batch_size=2)
    noise = pipeline.noise(0, len(PROMPTS))
    # The fresh noise the JAX sampler draws before a later step (scm_sample: one key per time, from the
    # batch's key); the scheduler draws it through randn_tensor, once per step.
    keys = jax.random.split(batch_key(0, 0), steps + 1)
    fresh = [to_torch(jax.random.normal(k, noise.shape)) for k in keys[:steps]]
    monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda shape, **_: fresh.pop(0))
    pipe = SanaSprintPipeline.from_pretrained(sprint)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, num_inference_steps=steps, intermediate_timesteps=None, latents=to_torch(noise),
                    height=32, width=32, use_resolution_binning=False, output_type="np").images
    assert fresh == []
    assert got.shape == want.shape == (2, 16, 16, 3)  # 8x8 latents, DC-AE f2
    assert np.abs(got - want).max() <= TOLERANCE
    assert want.std() > 0.05  # a real image, not a clipped constant


def test_prompts_are_lowercased_and_stripped_as_diffusers_does(pipeline):
    encoder = pipeline.text_encoder
    ids, _ = encoder.tokenize(PROMPTS[:1])
    np.testing.assert_array_equal(ids, encoder.tokenize(["a red circle on the left"])[0])
    encoder.lowercase = False  # training captions are read as written: "A" is not in the vocabulary
    try:
        assert not np.array_equal(encoder.tokenize(PROMPTS[:1])[0], ids)
    finally:
        encoder.lowercase = True


def test_sample_command_writes_the_api_images_batched_and_warns_of_a_long_prompt(exported, two_step_images,  # noqa: F811
                                                                                tmp_path, capsys):
    ckpt, sprint = exported
    out = tmp_path / "images"
    truncated = "has 517 tokens with the complex human instruction, more than the 495"
    with pytest.warns(CaptionTruncatedWarning, match=truncated):
        code = main(["sample", "--ckpt", str(ckpt), "--text-encoder", str(sprint), "--vae", str(sprint),
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", LONG, "--steps", "2",
                     "--batch-size", "2", "--out", str(out)])
    assert code == 0 and "sampled 3 image(s) in 2 step(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    pngs = [Image.open(out / f"{i:04d}.png") for i in range(3)]
    # The first batch is the API's two images; the second holds the long prompt and a padding copy.
    for png, image in zip(pngs, two_step_images):
        np.testing.assert_array_equal(np.asarray(png), (image * 255).round().astype(np.uint8))
    assert [png.text["prompt"] for png in pngs] == [*PROMPTS, LONG]
    settings = json.loads(pngs[2].text["s2flash"])
    assert settings == {"checkpoint": str(ckpt), "text_encoder": str(sprint), "vae": str(sprint), "steps": 2,
                        "seed": 0, "guidance_scale": 4.5, "batch_size": 2, "index": 2}

    # Two devices, each taking one prompt of a batch, in a process where torch never loads.
    again = tmp_path / "two_devices"
    code = (f"import sys; from s2flash_jax.cli import main; rc = main({['sample', '--ckpt', str(ckpt), '--vae', str(sprint), '--text-encoder', str(sprint), '--prompt', PROMPTS[0], '--prompt', PROMPTS[1], '--steps', '2', '--batch-size', '1', '--out', str(again)]!r}); "  # noqa: E501
            "import jax; assert jax.device_count() == 2; "
            "loaded = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not loaded, loaded; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fake_devices_env(2), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch size 1 rounded up to 2, a multiple of the 2 devices" in done.stdout
    for i, image in enumerate(two_step_images):
        difference = np.abs(np.asarray(Image.open(again / f"{i:04d}.png"), np.int16) - (image * 255).round())
        assert difference.max() <= 1  # the same image, up to rounding at a level boundary


def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys):  # noqa: F811
    ckpt, sprint = exported
    out = tmp_path / "out"
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--text-encoder", sprint, "--vae", sprint, "--prompts-file", empty],
         "holds no prompts (expected one per line)"),
        (["--text-encoder", sprint, "--vae", tmp_path / "nowhere", "--prompt", "red"],
         f"--vae '{tmp_path / 'nowhere'}' does not exist"),
        (["--vae", sprint, "--prompt", "red"], "has no text_encoder: prompt-to-image sampling needs both; pass "
                                               "--text-encoder"),
        (["--text-encoder", sprint / "vae", "--vae", sprint, "--prompt", "red"], "vae has no tokenizer.json"),
    ]
    for args, message in cases:
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert main(["sample", "--ckpt", str(ckpt), *map(str, args), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("s2flash sample: error: ") and err.count("\n") == 1 and message in err, err
        assert not out.exists() and not list(tmp_path.glob(".out*"))
