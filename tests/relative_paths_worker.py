"""Every writer of the `s2flash` command, given relative paths, run from a fresh working directory
(the current one, as tests/test_relative_paths.py starts it): each command's inputs are the previous
commands' relative outputs, as a user chains them. Exits non-zero naming the first command that failed.

    cd SOMEWHERE_EMPTY && python REPO/tests/relative_paths_worker.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2flash_jax.cli import main  # noqa: E402
from tests.data_helpers import write_learnable_dataset  # noqa: E402
from tests.precompute_inputs import save_tiny_encoders, write_captioned_images  # noqa: E402

TINY = str(REPO / "configs/tiny.py")
QUICK = ["data.path=data/tiny", "train.steps=2", "train.log_every=0", "train.checkpoint_every=0"]
LEGACY = ["model.qk_norm=None", "model.timestep_scale=1.0"]  # base SANA's conventions: prepare-teacher's input

# (command line, the relative outputs it must have written), in an order in which each reads only
# what earlier ones wrote.
COMMANDS = [
    (["precompute", "--images", "images", "--vae", "encoders/vae", "--text-encoder", "encoders/text_encoder",
      "--resolution", "16", "--caption-length", "6", "--batch-size", "5", "--no-chi-prompt", "--out", "data/precomputed"],
     ["data/precomputed/dataset_info.json"]),
    (["train", "--config", f"{TINY}:teacher", "--out", "runs/legacy", "--export", "models/legacy", *QUICK, *LEGACY],
     ["runs/legacy/config.json", "models/legacy/model.json"]),
    (["prepare-teacher", "--config", f"{TINY}:teacher", "--from", "models/legacy", "--out", "models/teacher", *QUICK,
      "prepare_teacher.embedding_steps=1", "prepare_teacher.full_steps=1", "prepare_teacher.full_warmup_steps=0",
      "prepare_teacher.eval_examples=2", "prepare_teacher.eval_times=1"],
     ["models/teacher/model.json"]),
    (["train", "--config", TINY, "--out", "runs/student", "--teacher", "models/teacher", "--export", "models/student",
      *QUICK, "train.checkpoint_every=1"],
     ["runs/student/checkpoints/2", "models/student/model.json"]),
    (["export", "runs/student", "--model", "models/student-again"], ["models/student-again/model.json"]),
    (["sample", "--config", TINY, "--out", "samples/random", "sample.batch_size=2", "sample.steps=1"],
     ["samples/random/preview.png"]),
    (["convert", "export", "models/student", "--out", "diffusers/student"], ["diffusers/student/config.json"]),
    (["convert", "import", "--format", "diffusers", "diffusers/student", "--out", "models/imported"],
     ["models/imported/model.json"]),
    (["quantize", "models/student", "--bits", "8", "--out", "models/student-int8"], ["models/student-int8/model.json"]),
    (["merge", "models/student", "models/student-again", "--out", "models/merged"], ["models/merged/model.json"]),
]


def main_worker() -> int:
    write_learnable_dataset(Path("data/tiny"), 16)
    write_captioned_images(Path("images"))
    save_tiny_encoders(Path("encoders"))
    for argv, outputs in COMMANDS:
        code = main(argv)
        missing = [p for p in outputs if not Path(p).exists()]
        if code != 0 or missing:
            print(f"FAILED: s2flash {' '.join(argv)} -> exit {code}; missing {missing}", flush=True)
            return 1
        print(f"OK: s2flash {argv[0]} {argv[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_worker())
