"""Precompute training records: an image folder with captions -> latent + caption-embedding shards.

Input folder (the Hugging Face imagefolder conventions):
  - `name.{png,jpg,jpeg,webp}` with its caption in `name.txt` beside it (any depth), or
  - one `metadata.jsonl` at the top with {"file_name": "relative/path.png", "text": "caption"} lines.
Images are taken in sorted order (metadata.jsonl: file order), resized so the shorter side is
`resolution` (bicubic) and center-cropped to resolution x resolution, as SANA's training does.

Latents: diffusers `AutoencoderDC` (DC-AE) encode x `vae.config.scaling_factor`, NHWC.
Captions: a transformers text encoder (Gemma-2 for SANA), last hidden state, right padding, the
tokenizer's mask. With a `chi_prompt` (SANA's "complex human instruction") the prompt is
`chi_prompt + caption`, tokenised to len(tokens(chi_prompt)) + caption_length - 2 and cut to token
0 (bos) plus the last caption_length - 1 tokens, exactly as NVlabs' Sana training and diffusers'
SanaPipeline.encode_prompt do. Records store the caption up to its last real token (the rest is
padding, which readers restore as zeros).

Two backends compute the same records: "torch" (diffusers' AutoencoderDC and transformers'
Gemma-2; torch, diffusers and transformers are imported only when it runs) and "jax" (the JAX
DC-AE and Gemma-2 `CaptionEncoder`, read from the same folders by conversion/ without torch). Both
tokenize with `data.captions.tokenize_captions`; neither lowercases captions (diffusers' pipelines
do, at sampling time only). On the same float32 weights their records agree to ~1e-6 relative.

Shards are written as they complete (each atomically), batches never straddle two shards, and a
`precompute.json` manifest records the settings (the backend among them), so `resume=True`
continues an interrupted run with byte-identical shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from s2flash_jax.arguments import count
from s2flash_jax.data.captions import SANA_CHI_PROMPT, tokenize_captions
from s2flash_jax.data.records import (
    FLOAT_DTYPES,
    DataError,
    count_records,
    encode_record,
    read_dataset_info,
    remove_temp_files,
    shard_name,
    write_json_atomic,
    write_shards,
)
from s2flash_jax.outputs import OutputExists
from s2flash_jax.storage import resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "precompute.json"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "jax")


@dataclasses.dataclass(frozen=True)
class Example:
    image: Path
    name: str  # path relative to the images folder
    caption: str


# ---------------------------------------------------------------------------------------------
# Input folder


def list_examples(images_dir: str | Path) -> list[Example]:
    """The (image, caption) pairs of an image folder, in a fixed order."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"images folder {str(root)!r} does not exist")
    if (root / "metadata.jsonl").is_file():
        examples = _examples_from_metadata(root)
    else:
        examples = _examples_from_text_files(root)
    if not examples:
        raise DataError(f"images folder {str(root)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images; expected "
                        "name.png + name.txt pairs or a metadata.jsonl with file_name and text")
    return examples


def _examples_from_text_files(root: Path) -> list[Example]:
    examples = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            raise DataError(f"image {image} has no caption file {caption_file.name} beside it (and the folder has "
                            "no metadata.jsonl)")
        examples.append(Example(image, image.relative_to(root).as_posix(), caption_file.read_text().strip()))
    return examples


def _examples_from_metadata(root: Path) -> list[Example]:
    examples = []
    metadata = root / "metadata.jsonl"
    for line_number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, caption = entry["file_name"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{metadata} line {line_number}: expected a JSON object with file_name and text "
                            f"({type(e).__name__}: {e})") from None
        image = root / name
        if not image.is_file():
            raise DataError(f"{metadata} line {line_number}: image {name!r} does not exist in {root}")
        examples.append(Example(image, name, str(caption).strip()))
    return examples


def load_image(path: Path, resolution: int) -> np.ndarray:
    """An image as float32 [3, resolution, resolution] in [-1, 1]: shorter side resized (bicubic), center crop."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e})") from None
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))  # torchvision CenterCrop's rounding
    top = int(round((size[1] - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Encoders


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The loaded VAE and text encoder of one backend, as the run uses them.

    encode_images: [B, 3, R, R] in [-1, 1] -> scaled latents float32 [B, R/f, R/f, C];
    embed_captions: captions -> (embeddings float32 [B, L, D], mask int64 [B, L]).
    """

    factor: int
    scaling_factor: float
    text_encoder_class: str
    encode_images: Callable[[np.ndarray], np.ndarray]
    embed_captions: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def torch_encoders(vae_path: str, text_encoder_path: str, *, device: str, dtype: str, caption_length: int,
                   chi_prompt: str | None) -> Encoders:
    vae = load_vae(vae_path, device, dtype)
    tokenizer, text_encoder = load_text_encoder(text_encoder_path, device, dtype)
    return Encoders(vae.spatial_compression_ratio, float(vae.config.scaling_factor), type(text_encoder).__name__,
                    lambda images: encode_images(vae, images, device),
                    lambda captions: embed_captions(tokenizer, text_encoder, captions, caption_length, chi_prompt,
                                                    device))


def jax_encoders(vae_path: str, text_encoder_path: str, *, dtype: str, caption_length: int, chi_prompt: str | None,
                 batch_size: int) -> Encoders:
    """The JAX DC-AE and Gemma-2 on JAX's default device, each compiled once for batch_size inputs
    (a smaller last batch is padded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from s2flash_jax.model_checkpoint import CheckpointError
    from s2flash_jax.precision import Precision

    # conversion/ is imported here only (as the CLI does for `convert`): it reads the diffusers and
    # transformers folders without torch.
    from conversion.dc_ae import load_dc_ae
    from conversion.gemma2 import load_caption_encoder

    precision = Precision(param_dtype=dtype, compute_dtype=dtype)
    try:
        vae = load_dc_ae(vae_path, precision=precision)
        text_encoder = load_caption_encoder(text_encoder_path, caption_length=caption_length, chi_prompt=chi_prompt,
                                            precision=precision)
    except CheckpointError as e:
        raise DataError(str(e)) from e
    scaling_factor = float(vae.config.scaling_factor)
    graphdef, vae_params = nnx.split(vae)
    # The bare encoder takes diffusers' [-1, 1] pixels, exactly what load_image gives.
    encode = jax.jit(lambda params, pixels: nnx.merge(graphdef, params).encoder(
        pixels.astype(precision.compute)).astype(jnp.float32) * scaling_factor)
    embed = jax.jit(text_encoder.embed)

    def pad(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), axis=0)]) if len(x) < batch_size else x

    def latents_of(images: np.ndarray) -> np.ndarray:
        return np.asarray(encode(vae_params, pad(images.transpose(0, 2, 3, 1))))[:len(images)]

    def embeddings_of(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = text_encoder.tokenize(captions)
        hidden, kept = embed(text_encoder.params, pad(ids), pad(mask))
        return np.asarray(hidden)[:len(captions)], np.asarray(kept)[:len(captions)].astype(np.int64)

    return Encoders(vae.config.factor, scaling_factor, type(text_encoder.model).__name__, latents_of, embeddings_of)


# The torch backend's models


def _subfolder(path: str, name: str) -> str:
    """A diffusers pipeline folder works too: use its `name/` subfolder."""
    return str(Path(path) / name) if (Path(path) / name / "config.json").is_file() else path


def load_vae(vae_path: str, device: str, dtype: str):
    import torch
    from diffusers import AutoencoderDC

    vae = AutoencoderDC.from_pretrained(_subfolder(vae_path, "vae"), torch_dtype=getattr(torch, dtype))
    return vae.to(device).eval()


def load_text_encoder(text_encoder_path: str, device: str, dtype: str):
    """(tokenizer, model) from a folder with both (or a pipeline folder with text_encoder/ + tokenizer/)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer_path = text_encoder_path
    if (Path(text_encoder_path) / "tokenizer").is_dir():
        tokenizer_path = str(Path(text_encoder_path) / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.padding_side = "right"  # SANA pads captions on the right
    model = AutoModel.from_pretrained(_subfolder(text_encoder_path, "text_encoder"), dtype=getattr(torch, dtype))
    return tokenizer, model.to(device).eval()


def encode_images(vae, images: np.ndarray, device: str) -> np.ndarray:
    """images: [B, 3, R, R] in [-1, 1] -> scaled latents float32 [B, R/f, R/f, C] (NHWC)."""
    import torch

    with torch.inference_mode():
        pixels = torch.from_numpy(images).to(device=device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent * vae.config.scaling_factor
    return latents.float().permute(0, 2, 3, 1).cpu().numpy()


def embed_captions(tokenizer, text_encoder, captions: Sequence[str], caption_length: int,
                   chi_prompt: str | None, device: str) -> tuple[np.ndarray, np.ndarray]:
    """captions -> (embeddings float32 [B, L, D], mask int64 [B, L]), L = caption_length (SANA's recipe,
    see `data.captions.tokenize_captions`)."""
    import torch

    tokens = tokenize_captions(tokenizer, captions, caption_length, chi_prompt)
    with torch.inference_mode():
        hidden = text_encoder(torch.from_numpy(tokens.input_ids).to(device),
                              attention_mask=torch.from_numpy(tokens.attention_mask).to(device))
        hidden = hidden.last_hidden_state.float().cpu()
    return hidden[:, list(tokens.keep)].numpy(), tokens.kept_mask


# ---------------------------------------------------------------------------------------------
# The run


def precompute(images_dir: str | Path, out_dir: str | Path, *, vae_path: str, text_encoder_path: str,
               resolution: int, caption_length: int = 300, batch_size: int = 8, records_per_shard: int = 1024,
               force: bool = False, resume: bool = False, device: str = "cpu", dtype: str = "float32",
               storage_dtype: str = "float16", chi_prompt: str | None = SANA_CHI_PROMPT, prefix: str = "train",
               progress: bool = True, backend: str = "torch") -> dict[str, Any]:
    """Encode every image and caption of `images_dir` into shards in `out_dir`; returns dataset_info.

    dtype: the encoders' compute dtype (and, for the jax backend, weight dtype); storage_dtype: the
    records' float dtype; backend: "torch" (on `device`) or "jax" (on JAX's default device).
    An existing non-empty out_dir is refused unless resume (continue an interrupted run with the
    same settings) or force (delete it and start over).
    """
    _check_arguments(resolution, caption_length, batch_size, records_per_shard, dtype, storage_dtype, resume, force)
    if backend not in BACKENDS:
        raise DataError(f"--backend {backend!r} must be one of {', '.join(BACKENDS)}")
    if backend == "jax" and device != "cpu":
        raise DataError(f"--device {device!r} is for the torch backend; the jax backend runs on JAX's default device")
    examples = list_examples(images_dir)
    out_dir = resolve(out_dir)
    if resolve(images_dir).resolve().is_relative_to(out_dir.resolve()):
        raise DataError(f"output folder {str(out_dir)!r} contains the images folder; choose another --out")
    manifest = {
        "images": len(examples),
        "images_digest": _digest(examples),
        "vae": _identify(vae_path),
        "text_encoder": _identify(text_encoder_path),
        "resolution": resolution,
        "caption_length": caption_length,
        "chi_prompt": chi_prompt or None,
        "records_per_shard": records_per_shard,
        "prefix": prefix,
        "dtype": dtype,
        "storage_dtype": storage_dtype,
        "backend": backend,
    }
    num_shards = math.ceil(len(examples) / records_per_shard)
    first_shard = _first_shard_to_write(out_dir, manifest, num_shards, resume=resume, force=force)
    info = read_dataset_info(out_dir) if first_shard else None
    if first_shard == num_shards and info is not None:
        return info  # a finished run: nothing to resume

    # Load (and check) the models before touching out_dir: a bad --vae must not cost a --force'd folder.
    settings = dict(dtype=dtype, caption_length=caption_length, chi_prompt=chi_prompt or None)
    encoders = (torch_encoders(vae_path, text_encoder_path, device=device, **settings) if backend == "torch" else
                jax_encoders(vae_path, text_encoder_path, batch_size=batch_size, **settings))
    if resolution % encoders.factor:
        raise DataError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor "
                        f"{encoders.factor}")
    if first_shard == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or --force
        out_dir.mkdir(parents=True)
        write_json_atomic(out_dir / MANIFEST, manifest)

    from tqdm import tqdm

    start = first_shard * records_per_shard
    with tqdm(total=len(examples), initial=start, unit="img", desc="precompute", disable=not progress) as bar:
        encode_batch = _BatchEncoder(encoders, resolution, storage_dtype)
        records = _records(examples, first_shard, num_shards, records_per_shard, batch_size, encode_batch, bar)
        write_shards(records, out_dir, records_per_shard=records_per_shard, prefix=prefix,
                     num_records=len(examples), first_shard=first_shard,
                     info={
                         "caption_length": caption_length,  # records hold fewer when captions are short
                         "vae": _identify(vae_path),
                         "scaling_factor": encoders.scaling_factor,
                         "text_encoder": _identify(text_encoder_path),
                         "text_encoder_class": encoders.text_encoder_class,
                         "resolution": resolution,
                         "chi_prompt": chi_prompt or None,
                     })
    return read_dataset_info(out_dir)


def _check_arguments(resolution, caption_length, batch_size, records_per_shard, dtype, storage_dtype, resume, force):
    for name, value in (("--resolution", resolution), ("--caption-length", caption_length),
                        ("--batch-size", batch_size), ("--records-per-shard", records_per_shard)):
        if value < 1:
            raise DataError(f"{name} {value} must be >= 1")
    if dtype not in COMPUTE_DTYPES:
        raise DataError(f"--dtype {dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}")
    if storage_dtype not in FLOAT_DTYPES:
        raise DataError(f"--storage-dtype {storage_dtype!r} must be one of {', '.join(FLOAT_DTYPES)}")
    if resume and force:
        raise DataError("--resume and --force exclude each other (continue the run, or delete it and start over)")


def _identify(path: str) -> str:
    """A local folder by its absolute path (resuming from another directory is no change); else as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for example in examples:
        h.update(json.dumps([example.name, example.caption]).encode())
    return h.hexdigest()


def _first_shard_to_write(out_dir: Path, manifest: dict[str, Any], num_shards: int, *, resume: bool,
                          force: bool) -> int:
    """0 for a fresh start (out_dir absent, empty, or --force); with --resume, the first missing shard."""
    if out_dir.is_file():
        raise OutputExists(f"output {str(out_dir)!r} is a file; expected a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()) or force:
        return 0
    if not resume:
        raise OutputExists(f"output {str(out_dir)!r} already exists and is not empty; pass --resume to continue "
                           "an interrupted precompute or --force to replace it")
    _check_manifest(out_dir, manifest)
    remove_temp_files(out_dir, manifest["prefix"])
    return _count_complete_shards(out_dir, manifest, num_shards)


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise OutputExists(f"output {str(out_dir)!r} has no {MANIFEST}, so it is not a precompute run to resume; "
                           "pass --force to replace it")
    previous = {"backend": "torch", **json.loads(path.read_text())}  # manifests from before the jax backend
    changed = [key for key in manifest if previous.get(key) != manifest[key]]
    if changed:
        details = "; ".join(f"{key}: was {previous.get(key)!r}, now {manifest[key]!r}" for key in changed
                            if key != "images_digest")
        if "images_digest" in changed:
            details = "; ".join(filter(None, [details, "the image names or captions differ"]))
        raise DataError(f"cannot resume the precompute in {str(out_dir)!r}: its settings differ ({details}); "
                        "rerun with the original settings, or --force to start over")


def _count_complete_shards(out_dir: Path, manifest: dict[str, Any], num_shards: int) -> int:
    """How many leading shards are complete; a later shard without its predecessors is an error."""
    rps, total = manifest["records_per_shard"], manifest["images"]
    done = 0
    while done < num_shards and (out_dir / shard_name(manifest["prefix"], done, num_shards)).is_file():
        path = out_dir / shard_name(manifest["prefix"], done, num_shards)
        expected = min(rps, total - done * rps)
        if count_records(path) != expected:
            raise DataError(f"{path} holds {count_records(path)} records, expected {expected}; delete it and resume")
        done += 1
    stray = [name for i in range(done, num_shards)
             if (out_dir / (name := shard_name(manifest["prefix"], i, num_shards))).exists()]
    if stray:
        raise DataError(f"{str(out_dir)!r} has shard(s) {', '.join(stray)} after a missing one; delete them and resume")
    return done


def _records(examples: Sequence[Example], first_shard: int, num_shards: int, records_per_shard: int,
             batch_size: int, encode_batch: Callable[[Sequence[Example]], list[bytes]], bar) -> Iterator[bytes]:
    """Encoded records from first_shard on. Batches stay inside one shard, so a resumed run computes
    every shard from the same batches as an uninterrupted one (bitwise equal shards)."""
    for shard in range(first_shard, num_shards):
        stop = min((shard + 1) * records_per_shard, len(examples))
        for begin in range(shard * records_per_shard, stop, batch_size):
            batch = examples[begin:min(begin + batch_size, stop)]
            yield from encode_batch(batch)
            bar.update(len(batch))


@dataclasses.dataclass(frozen=True)
class _BatchEncoder:
    """Examples -> encoded records, with the loaded models."""

    encoders: Encoders
    resolution: int
    storage_dtype: str

    def __call__(self, batch: Sequence[Example]) -> list[bytes]:
        images = np.stack([load_image(e.image, self.resolution) for e in batch])
        latents = self.encoders.encode_images(images)
        embeddings, masks = self.encoders.embed_captions([e.caption for e in batch])
        records = []
        for example, latent, embedding, mask in zip(batch, latents, embeddings, masks):
            tokens = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else 1  # drop trailing padding
            records.append(encode_record(latent=latent, caption_embedding=embedding[:tokens],
                                         caption_mask=mask[:tokens], caption=example.caption,
                                         dtype=self.storage_dtype))
        return records


# ---------------------------------------------------------------------------------------------
# Command line (wired into `s2flash precompute` by cli.py)


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="image folder: name.png + name.txt caption pairs, or a metadata.jsonl (file_name, text)")
    parser.add_argument("--vae", required=True, metavar="PATH",
                        help="diffusers AutoencoderDC folder (or a pipeline folder with vae/)")
    parser.add_argument("--text-encoder", required=True, metavar="PATH",
                        help="folder with a transformers tokenizer + text encoder, e.g. Gemma-2 "
                             "(or a pipeline folder with text_encoder/ and tokenizer/)")
    parser.add_argument("--resolution", required=True, type=count(1), help="square training resolution in pixels")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    parser.add_argument("--caption-length", type=count(1), default=300, help="caption tokens kept (default 300, SANA's)")
    parser.add_argument("--batch-size", type=count(1), default=8, help="images encoded at once (default 8)")
    parser.add_argument("--records-per-shard", type=count(1), default=1024, help="records per ArrayRecord file")
    parser.add_argument("--chi-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="prepend SANA's complex human instruction to captions (default on, as SANA trains)")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="torch: diffusers' AutoencoderDC + transformers' Gemma-2 (the [torch] extra); jax: the "
                             "JAX DC-AE + Gemma-2 on JAX's default device, read from the same folders without torch")
    parser.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="encoders' compute dtype")
    parser.add_argument("--storage-dtype", default="float16", choices=FLOAT_DTYPES,
                        help="float dtype of the stored records (default float16)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--force", action="store_true", help="delete an existing --out and start over")


def run_precompute(args: argparse.Namespace) -> int:
    """Run `s2flash precompute` from parsed arguments; bad input is one line on stderr and exit code 2."""
    try:
        info = precompute(args.images, args.out, vae_path=args.vae, text_encoder_path=args.text_encoder,
                          resolution=args.resolution, caption_length=args.caption_length, batch_size=args.batch_size,
                          records_per_shard=args.records_per_shard, force=args.force, resume=args.resume,
                          device=args.device, dtype=args.dtype, storage_dtype=args.storage_dtype,
                          chi_prompt=SANA_CHI_PROMPT if args.chi_prompt else None, backend=args.backend)
    except (DataError, OutputExists) as e:
        print(f"s2flash precompute: error: {e}", file=sys.stderr)
        return 2
    print(f"{info['num_records']} records in {info['num_shards']} shards in {args.out}: latents "
          f"{tuple(info['latent_shape'])} {info['latent_dtype']}, captions up to {info['caption_length']} x "
          f"{info['caption_dim']}")
    return 0
