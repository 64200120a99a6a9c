"""`s2flash sample` end to end on the tiny config, and its refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest

from s2flash_jax.cli import main
from tests.conftest import REPO


def test_sample_writes_latents_preview_and_config(tmp_path, capsys):
    out = tmp_path / "sample"
    rc = main(["sample", "--config", str(REPO / "configs/tiny.py"), "--out", str(out), "sample.batch_size=2",
               "sample.steps=2"])
    assert rc == 0
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, 8, 8, 4) and np.isfinite(latents).all()
    assert (out / "preview.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["sample"]["steps"] == 2
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]  # no staging directory left behind


def test_sample_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "sample"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["sample", "--config", str(REPO / "configs/tiny.py"), "--out", str(out)])
    assert rc == 2
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["sample", "--config", str(REPO / "configs/tiny.py"), "--out", str(out), "--force",
                 "sample.batch_size=1", "sample.steps=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "latents.npy", "preview.png"]


def test_teacher_variant_samples_with_the_flow_sampler(tmp_path):
    out = tmp_path / "teacher"
    assert main(["sample", "--config", str(REPO / "configs/tiny.py:teacher"), "--out", str(out),
                 "sample.batch_size=1", "sample.flow_shift=3.0"]) == 0
    assert np.isfinite(np.load(out / "latents.npy")).all()


def test_bad_override_fails_before_writing(tmp_path):
    out = tmp_path / "sample"
    result = subprocess.run([sys.executable, "-m", "s2flash_jax.cli", "sample", "--config",
                             str(REPO / "configs/tiny.py"), "--out", str(out), "sample.stepz=2"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "s2flash sample: error: override 'sample.stepz=2': unknown config key 'sample.stepz' "
        "(did you mean 'sample.steps'?); keys here: steps, batch_size, height, width, guidance_scale, flow_shift, seed"]
    assert not out.exists()


@pytest.mark.parametrize("variant", ["", ":s2flash", ":sd35_flash", ":lcm", ":twinflow"])
def test_a_distillation_without_a_teacher_is_refused_before_any_work(tmp_path, capsys, variant):
    """Distilling from a randomly initialised teacher "trains" and wastes a pod-day: each recipe that
    needs a teacher names train.teacher_checkpoint / --teacher, and writes nothing."""
    code = main(["train", "--config", f"{REPO}/configs/tiny.py{variant}", "--out", str(tmp_path / "run"),
                 "train.teacher_checkpoint=", "data.path=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "train.teacher_checkpoint is not set: pass --teacher CKPT" in err and "=random" in err
    assert not (tmp_path / "run").exists()


def test_flow_matching_and_a_random_teacher_on_purpose_need_no_checkpoint():
    from s2flash_jax.config import load_config
    from s2flash_jax.train.state import check_teacher_source

    check_teacher_source(load_config(f"{REPO}/configs/tiny.py:teacher"))
    check_teacher_source(load_config(f"{REPO}/configs/tiny.py", ["train.teacher_checkpoint=random"]))
    twinflow_own_start = ["train.teacher_checkpoint=", "train.init_student_from_teacher=false"]
    check_teacher_source(load_config(f"{REPO}/configs/tiny.py:twinflow", twinflow_own_start))


def test_export_refuses_what_it_cannot_export_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    for args, message in ((["export", str(tmp_path / "run")], "nothing to write; give --model CKPT"),
                          (["export", str(tmp_path / "nothing"), "--model", str(tmp_path / "m")],
                           "is not a run directory: it has no config.json")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m").exists()
