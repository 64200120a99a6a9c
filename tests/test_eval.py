"""`s2flash eval` end to end on a tiny random 304 px model: the streamed FID, patch FID and CLIP score
equal the same metrics recomputed from the exported PNGs in one batch; saved reference statistics
reproduce them; the GenEval / MJHQ / file exports have the layouts their evaluators read; bad input
is one line and writes nothing."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conversion.inception import expected_torch_shapes, load_inception
from s2flash_jax.cli import main
from s2flash_jax.data import shapes
from s2flash_jax.eval import export as prompt_sets
from s2flash_jax.eval.fid import load_statistics
from s2flash_jax.eval.frechet import frechet_distance
from s2flash_jax.eval.inception import InceptionFeatures, crop_patches, features_to_host, patch_origins
from s2flash_jax.model_checkpoint import save_model
from s2flash_jax.models.sana import SanaConfig, SanaTransformer
from s2flash_jax.models.text_encoder import FrozenTextEncoder, TextEncoderConfig, WordTokenizer

FACTOR = 16  # space-to-depth: 304 px images are 19x19 tokens, so patch FID (299 px crops) runs on a tiny model
IMAGE = 304
PROMPTS = ["a big red circle at the center", "a small cyan square at the right", "a big green square at the top right",
           "a small red circle at the bottom right", "a big blue triangle at the left"]
GENEVAL = [  # GenEval's evaluation_metadata.jsonl lines (its tags and clauses), in the shapes vocabulary
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
     "prompt": "a blue square and a blue square"},
    {"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1,
                                                                       "position": ["left of", 0]}],
     "prompt": "a square at the left and a circle at the right"},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random shapes-vocabulary model checkpoint making 304 px images, random Inception weights as
    .npz (no torch), reference images, and the three prompt set files."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = WordTokenizer.from_vocabulary(shapes.VOCABULARY, max_length=12)
    encoder = FrozenTextEncoder(tokenizer, TextEncoderConfig(vocab_size=tokenizer.vocab_size, width=32, depth=1,
                                                             max_length=12))
    encoder.save(root / "text_encoder")
    config = SanaConfig(in_channels=3 * FACTOR**2, out_channels=3 * FACTOR**2, num_attention_heads=2,
                        attention_head_dim=16, num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                        cross_attention_dim=32, caption_channels=32, mlp_ratio=2.0, sample_size=IMAGE // FACTOR,
                        patch_size=1, guidance_embeds=True, timestep_scale=1.0)
    params = nnx.state(SanaTransformer(config, rngs=nnx.Rngs(0)), nnx.Param)

    def components(staging):
        encoder.save(staging / "text_encoder")

    save_model(root / "ckpt", config, params, metadata={
        "text_encoder": "text_encoder", "autoencoder": {"kind": "space_to_depth", "factor": FACTOR,
                                                        "scaling_factor": 1.0},
        "sampling": {"guidance_scale": 1.0, "flow_shift": 1.0}}, write_components=components)

    # pool3 features of order one: He-like conv weights, batch-norm gains that keep the scale through ReLUs.
    rng = np.random.default_rng(0)
    weights = {}
    for key, shape in expected_torch_shapes().items():
        if key.endswith("conv.weight"):
            weights[key] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            weights[key] = np.full(shape, 1.6 if key.endswith("weight") else 1.0, np.float32)
        else:
            weights[key] = rng.normal(0, 0.05, shape).astype(np.float32) if key.endswith("bias") else np.zeros(shape,
                                                                                                            np.float32)
    np.savez(root / "inception.npz", **weights)

    refs = root / "reference" / "animals"
    refs.mkdir(parents=True)
    for i in range(5):  # smooth random images, one of another size (grouped by size on the device)
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((IMAGE, IMAGE + 16 * (i == 4)), Image.Resampling.BICUBIC).save(refs / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (root / "geneval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in GENEVAL))
    (root / "mjhq.json").write_text(json.dumps({f"id{i:03d}": {"prompt": p, "category": ("people", "animals")[i % 2]}
                                                for i, p in enumerate(PROMPTS[:3])}))
    return root


def run(capsys, *args):
    rc = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def features_of(extractor, images):
    return features_to_host(extractor(np.stack(images)))


@pytest.mark.slow  # ~3 min on 2 cores: ten 2048-d Fréchet distances and a full-size Inception; CI skips it
def test_streamed_metrics_equal_the_exported_images_metrics(assets, tmp_path, capsys):
    """Chunks of 3 images (so statistics and CLIP scores are accumulated over several chunks and a
    padded last batch) against one batch of the written PNGs, read back as a user's evaluator would."""
    out, export, stats = tmp_path / "out", tmp_path / "export", tmp_path / "ref.npz"
    clip = pytest.importorskip("tests.test_clip_score")
    clip_folder = tmp_path / "clip"
    tokenizer = clip.tiny_tokenizer()
    clip.tiny_reference("quick_gelu", False, vocab_size=len(tokenizer)).save_pretrained(clip_folder)
    tokenizer.save_pretrained(clip_folder)
    from conversion.clip import load_clip_scorer

    rc, stdout, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "file", "--prompts-path",
                          assets / "prompts.txt", "--steps", "1,2", "--inception", assets / "inception.npz",
                          "--ref-images", assets / "reference", "--save-ref-stats", stats, "--clip", clip_folder,
                          "--out", out, "--export", export, "--chunk", 3)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"1", "2"} and "| 2 | 5 |" in (out / "metrics.md").read_text()

    extractor = InceptionFeatures(load_inception(assets / "inception.npz"))
    reference = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((assets / "reference").rglob("*.png"))]
    ref_features = features_of(extractor, reference[:4]), features_of(extractor, reference[4:])
    ref_whole = np.concatenate(ref_features)
    ref_patches = np.concatenate([features_of(extractor, crop_patches(np.stack([r]), patch_origins(*r.shape[:2],
                                                                                                   "center")))
                                  for r in reference])
    scorer = load_clip_scorer(clip_folder)
    generated_by_steps = {}
    for steps in ("1", "2"):
        files = sorted((export / f"steps_{steps}").glob("*.png"))
        assert [f.name for f in files] == [f"{i:05d}.png" for i in range(len(PROMPTS))]
        images = np.stack([np.asarray(Image.open(f)) for f in files])
        generated_by_steps[steps] = images
        assert images.shape == (len(PROMPTS), IMAGE, IMAGE, 3)
        whole = features_of(extractor, list(images))
        patches = features_of(extractor, crop_patches(images, patch_origins(IMAGE, IMAGE, "center")))
        result = metrics["results"][steps]
        assert result["fid"] == pytest.approx(frechet_distance(whole, ref_whole), rel=1e-5)
        assert result["patch_fid"] == pytest.approx(frechet_distance(patches, ref_patches), rel=1e-5)
        assert result["clip_score"] == pytest.approx(float(scorer(images, PROMPTS).mean()), rel=1e-5)
        lines = [json.loads(line) for line in (export / f"steps_{steps}" / "metadata.jsonl").read_text().splitlines()]
        assert lines == [{"file_name": f.name, "text": p} for f, p in zip(files, PROMPTS)]
        png_settings = json.loads(Image.open(files[1]).text["s2flash"])
        assert png_settings["steps"] == int(steps) and Image.open(files[1]).text["prompt"] == PROMPTS[1]
    assert not np.array_equal(generated_by_steps["1"], generated_by_steps["2"])
    assert metrics["results"]["1"]["fid"] > 0

    saved = load_statistics(stats)
    assert saved.count == 5 and saved.patch_count == 5 and saved.meta["resize"] == "clean"
    np.testing.assert_allclose(saved.mean, ref_whole.mean(0), rtol=1e-5, atol=1e-6)

    # The saved statistics stand in for the images: the same numbers, without --ref-images.
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "file", "--prompts-path", assets / "prompts.txt",
                     "--steps", "2", "--inception", assets / "inception.npz", "--ref-stats", stats,
                     "--out", tmp_path / "again", "--chunk", 3)
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["results"]["2"]
    assert again["fid"] == pytest.approx(metrics["results"]["2"]["fid"], rel=1e-9)
    assert again["patch_fid"] == pytest.approx(metrics["results"]["2"]["patch_fid"], rel=1e-9)


def check_geneval_layout(folder: Path, metadata_lines: list[dict], images_per_prompt: int) -> None:
    """What GenEval's evaluation/evaluate_images.py reads, as its README documents the layout:
    every numeric subfolder <i>/ holds metadata.jsonl, one JSON object read with json.load (so exactly
    one), with the 'prompt' and 'tag' it reports and the 'include' (and optional 'exclude') clauses it
    scores; the images are the files of <i>/samples/ named \\d+.png, RGB, all of one size."""
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    assert [int(p.name) for p in folders] == list(range(len(metadata_lines)))
    assert all(len(p.name) == 5 for p in folders)
    sizes = set()
    for expected, sub in zip(metadata_lines, folders):
        with open(sub / "metadata.jsonl") as f:
            metadata = json.load(f)  # as evaluate_images.py does: one object, not a line per image
        assert metadata == expected
        assert isinstance(metadata["prompt"], str) and isinstance(metadata["tag"], str)
        for i, clause in enumerate(metadata["include"]):
            assert isinstance(clause["class"], str) and isinstance(clause["count"], int)
            if "position" in clause:  # [relation, index of an earlier include clause]
                relation, target = clause["position"]
                assert relation in ("left of", "right of", "above", "below") and 0 <= target < i
        samples = sorted(p.name for p in (sub / "samples").iterdir())
        assert all(re.fullmatch(r"\d+\.png", name) for name in samples)
        assert samples == [f"{k:04d}.png" for k in range(images_per_prompt)]
        for name in samples:
            with Image.open(sub / "samples" / name) as image:
                assert image.mode == "RGB"
                sizes.add(image.size)
    assert len(sizes) == 1


def test_geneval_export_has_the_evaluators_layout(assets, tmp_path, capsys):
    export = tmp_path / "geneval"
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "geneval", "--prompts-path",
                     assets / "geneval.jsonl", "--steps", "1", "--images-per-prompt", 2, "--export", export,
                     "--out", tmp_path / "out")
    assert rc == 0, err
    assert sorted(p.name for p in export.iterdir()) == ["steps_1"]
    check_geneval_layout(export / "steps_1", GENEVAL, images_per_prompt=2)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["prompts"] == {"set": "geneval", "count": 3, "images_per_prompt": 2}
    assert metrics["results"]["1"]["images"] == 6


def test_geneval_layout_check_catches_what_the_evaluator_would_trip_on(assets, tmp_path):
    """The schema check is not vacuous: each of these layouts breaks it."""
    entries = prompt_sets.read_prompt_set("geneval", assets / "geneval.jsonl")
    image = np.full((4, 4, 3), 0.5, np.float32)

    def exported(name):
        exporter = prompt_sets.Exporter("geneval", tmp_path / name, entries, 1, {})
        exporter.add(np.stack([image] * len(entries)), 0)
        exporter.finish()
        return tmp_path / name

    check_geneval_layout(exported("good"), GENEVAL, 1)
    breakages = {
        "two_lines": lambda root: (root / "00001" / "metadata.jsonl").write_text(
            json.dumps(GENEVAL[1]) + "\n" + json.dumps(GENEVAL[1]) + "\n"),
        "renamed": lambda root: (root / "00000" / "samples" / "0000.png").rename(root / "00000" / "samples" / "a.png"),
        "missing": lambda root: (root / "00002" / "samples" / "0000.png").unlink(),
    }
    for name, breakage in breakages.items():
        root = exported(name)
        breakage(root)
        with pytest.raises((AssertionError, json.JSONDecodeError)):
            check_geneval_layout(root, GENEVAL, 1)


def test_mjhq_export_mirrors_the_reference_folders(assets, tmp_path, capsys):
    export = tmp_path / "mjhq"
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "mjhq", "--prompts-path", assets / "mjhq.json",
                     "--steps", "1", "--export", export, "--out", tmp_path / "out")
    assert rc == 0, err
    root = export / "steps_1"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) == [
        "animals/id001.png", "people/id000.png", "people/id002.png"]
    meta = json.loads((root / "meta_data.json").read_text())
    assert meta == json.loads((assets / "mjhq.json").read_text())


def test_limit_spans_the_set(assets):
    entries = prompt_sets.read_prompt_set("file", assets / "prompts.txt")
    assert [e.prompt for e in prompt_sets.subset(entries, 3)] == [PROMPTS[0], PROMPTS[2], PROMPTS[4]]


@pytest.mark.parametrize("args, message", [
    (["--prompts", "geneval", "--prompts-path", "{bad_geneval}"], "line 2: 'include' is not a list"),
    (["--prompts", "mjhq", "--prompts-path", "{missing}"], "does not exist; expected MJHQ-30K's meta_data.json"),
    (["--prompts", "coco", "--prompts-path", "{prompts}"], "--prompts 'coco' is not one of file, geneval, mjhq"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--steps", "1,two"], "expected comma-separated integers"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--steps", "0"], "--steps 0 must be >= 1"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--ref-stats", "{stats}"],
     "reference statistics are for FID, which needs --inception"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--inception", "{inception}"],
     "FID needs reference statistics"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--inception", "{inception}", "--ref-stats", "{stats}",
      "--fid-resize", "pytorch-fid"], "made with resize='clean', this run uses 'pytorch-fid'"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--inception", "{prompts}", "--ref-stats", "{stats}"],
     "is a file of unknown kind (.txt); expected pytorch-fid's"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--inception", "{inception}", "--ref-stats", "{prompts}"],
     "cannot be read as a .npz file"),
    (["--prompts", "file", "--prompts-path", "{prompts}", "--patch-fid", "corners"], "--patch-fid 'corners' is not"),
])
def test_bad_input_is_one_line_and_writes_nothing(assets, tmp_path, capsys, args, message):
    from s2flash_jax.eval.fid import Statistics, save_statistics

    stats = tmp_path / "stats.npz"
    save_statistics(Statistics(np.zeros(2048), np.eye(2048), 10, meta={"resize": "clean"}), stats)
    (tmp_path / "bad.jsonl").write_text(json.dumps(GENEVAL[0]) + "\n" + json.dumps({**GENEVAL[1], "include": 3}) + "\n")
    names = {"bad_geneval": tmp_path / "bad.jsonl", "missing": tmp_path / "nothing.json", "stats": stats,
             "prompts": assets / "prompts.txt", "inception": assets / "inception.npz"}
    before = sorted(tmp_path.iterdir())
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", *[a.format(**names) for a in args], "--out", tmp_path / "out",
                     "--export", tmp_path / "export")
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == before


def test_existing_outputs_need_force(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "file", "--prompts-path", assets / "prompts.txt",
                     "--steps", "1", "--export", tmp_path / "export", "--out", out, "--limit", 1)
    assert rc == 2 and "--out" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not (tmp_path / "export").exists()
    rc, _, err = run(capsys, "--ckpt", assets / "ckpt", "--prompts", "file", "--prompts-path", assets / "prompts.txt",
                     "--steps", "1", "--export", tmp_path / "export", "--out", out, "--limit", 1, "--force")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]
