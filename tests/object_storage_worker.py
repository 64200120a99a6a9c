"""A whole run on gs:// paths, in a fresh process pointed at tests/fake_gcs.py's emulator (the
variables must be set before tensorstore and gcsfs start). Started by tests/test_object_storage.py:

    python tests/object_storage_worker.py LOCAL_DIR

Trains the tiny config with its data and run directory in the bucket, stops, resumes there, exports
the product to the bucket, samples it into the bucket and converts it to a diffusers folder there,
and does the same with local paths; then damages the bucket run's newest checkpoint and resumes
again, and asks for an existing bucket output without --force. Prints one JSON line "RESULT {...}"
with what the test compares.
"""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from etils import epath
from PIL import Image

from conversion.exporter import export_checkpoint
from s2flash_jax.config import load_config
from s2flash_jax.model_checkpoint import save_model
from s2flash_jax.outputs import OutputExists
from s2flash_jax.models.space_to_depth import SpaceToDepthConfig
from s2flash_jax.models.text_encoder import FrozenTextEncoder, TextEncoderConfig, WordTokenizer
from s2flash_jax.pipeline import run_sample_checkpoint
from s2flash_jax.storage import files_under, upload_tree
from s2flash_jax.train.export import export_run
from s2flash_jax.train.loop import train
from tests.fake_gcs import BUCKET
from tests.tiny_data import write_tiny_dataset

WORDS = ("a", "red", "blue", "circle", "square")
PROMPT = "a red circle"


def components(local: Path) -> Path:
    """A model checkpoint carrying a text encoder and autoencoder that fit configs/tiny.py (32-wide
    captions of 8 tokens, 4 latent channels: 1-channel images folded 2x2), to export a student with."""
    tokenizer = WordTokenizer.from_vocabulary(WORDS, max_length=8)
    encoder = FrozenTextEncoder(tokenizer, TextEncoderConfig(vocab_size=tokenizer.vocab_size, width=32, max_length=8))
    encoder.save(local / "text_encoder")
    config = load_config("configs/tiny.py")
    metadata = {"text_encoder": "text_encoder", "autoencoder": {"kind": "space_to_depth", **SpaceToDepthConfig(
        factor=2, image_channels=1).__dict__}}

    def write(staging):
        import shutil

        shutil.copytree(local / "text_encoder", staging / "text_encoder")

    from flax import nnx

    from s2flash_jax.models.sana import SanaTransformer

    teacher = SanaTransformer(config.teacher, precision=config.precision, rngs=nnx.Rngs(3))
    return save_model(local / "teacher", config.teacher, nnx.state(teacher, nnx.Param), metadata=metadata,
                      write_components=write)


def main(local: str) -> None:
    local = Path(local)
    bucket = epath.Path(f"gs://{BUCKET}")
    data = write_tiny_dataset(local / "data")
    upload_tree(data, bucket / "data")
    teacher = components(local)
    result, configs = {}, {}
    for where, root, data_path in (("bucket", bucket, str(bucket / "data")), ("local", epath.Path(local), data)):
        config = load_config("configs/tiny.py", [f"data.path={data_path}", f"train.teacher_checkpoint={teacher}",
                                                 "train.steps=4", "train.checkpoint_every=2", "train.log_every=2",
                                                 "train.ema_decay=0.5", "train.sample_every=4"])
        configs[where] = config
        first = train(config, root / "run", stop_after=2, record_losses=True).losses
        rest = train(config, root / "run", resume=True, record_losses=True).losses
        export = export_run(root / "run", model=root / "export")
        written = run_sample_checkpoint(export.model, [PROMPT], out=root / "samples", steps=2)
        image = np.asarray(Image.open(written[0].open("rb")))
        export_checkpoint(export.model, root / "diffusers")
        result[where] = {"losses": first + rest, "image": image.tolist(),
                         "diffusers": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                       for p in (root / "diffusers").iterdir()},
                         "files": sorted(p.name for p in (root / "run").iterdir()),
                         "checkpoints": sorted(p.name for p in (root / "run" / "checkpoints").iterdir()),
                         "export": sorted(p.name for p in export.model.iterdir()),
                         "run": json.loads((export.model / "model.json").read_text())["run"]["step"]}
    result["fallback"] = resume_past_a_damaged_checkpoint(bucket / "run", configs["bucket"])
    try:
        export_run(bucket / "run", model=bucket / "export")
        result["refused"] = ""
    except OutputExists as e:
        result["refused"] = str(e)
    print("RESULT " + json.dumps(result), flush=True)


def resume_past_a_damaged_checkpoint(run: epath.Path, config) -> dict:
    """Truncate every array file of the newest checkpoint (4) in the bucket, resume with two more
    steps, and report what the run restored from."""
    newest = run / "checkpoints" / "4"
    damaged = [newest / "state" / name for name in files_under(newest / "state") if name.startswith("d/")]
    for path in damaged:
        path.write_bytes(b"not a checkpoint")
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=6))
    losses = train(longer, run, resume=True, record_losses=True, quiet=True).losses
    return {"damaged_files": len(damaged), "losses": losses,
            "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())}


if __name__ == "__main__":
    main(*sys.argv[1:])
