"""gs:// everywhere, against a real GCS server on 127.0.0.1 (tests/fake_gcs.py): a whole run in a
bucket (data, run directory, checkpoints, resume, export, samples, diffusers export) matches the
same run on local disk, a damaged newest checkpoint in the bucket falls back to the one before, and
an existing bucket output is refused without --force."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import REPO, fake_devices_env

pytest.importorskip("gcsfs", reason="the [gcs] extra (pip install -e '.[gcs]')")
pytest.importorskip("gcp_storage_emulator", reason="the [dev] extra")

from tests.fake_gcs import BUCKET, fake_gcs  # noqa: E402


def _request(url: str, method: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method)) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_emulator_refuses_stale_conditional_writes_and_lists_key_ranges():
    """What tensorstore (orbax) depends on and the stock emulator ignores."""
    with fake_gcs() as env:
        url = env["STORAGE_EMULATOR_HOST"]
        upload = f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name="
        assert _request(upload + "a/1&ifGenerationMatch=0", "POST", b"first") == 200
        assert _request(upload + "a/1&ifGenerationMatch=0", "POST", b"second") == 412  # exists already
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/a%2F1") as response:
            generation = json.loads(response.read())["generation"]
        assert _request(upload + f"a/1&ifGenerationMatch={int(generation) + 1}", "POST", b"stale") == 412
        assert _request(upload + f"a/1&ifGenerationMatch={generation}", "POST", b"current") == 200
        with urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/a%2F1?alt=media") as response:
            assert response.read() == b"current" and response.headers["x-goog-generation"] != generation
        for name in ("a/0", "a/2", "b/0"):
            assert _request(upload + name, "POST", b"x") == 200
        query = f"{url}/storage/v1/b/{BUCKET}/o?prefix=a/&startOffset=a/1&endOffset=a/2"
        with urllib.request.urlopen(query) as response:
            assert [item["name"] for item in json.loads(response.read())["items"]] == ["a/1"]
        move = f"{url}/storage/v1/b/{BUCKET}/o/b%2F0/moveTo/o/b%2F1"
        assert _request(move, "POST", b"") == 200
        assert _request(f"{url}/storage/v1/b/{BUCKET}/o/b%2F0", "GET") == 404


@pytest.fixture(scope="module")
def bucket_and_local_runs(tmp_path_factory):
    with fake_gcs() as env:
        result = subprocess.run([sys.executable, str(REPO / "tests" / "object_storage_worker.py"),
                                 str(tmp_path_factory.mktemp("storage"))], cwd=REPO, capture_output=True, text=True,
                                env={**fake_devices_env(1), **env}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_a_run_in_a_bucket_resumes_exports_and_samples_as_a_local_one(bucket_and_local_runs):
    bucket, local = bucket_and_local_runs["bucket"], bucket_and_local_runs["local"]
    assert len(bucket["losses"]) == 4  # 2 updates, stopped, 2 more after resuming from the bucket
    for step, (b, l) in enumerate(zip(bucket["losses"], local["losses"])):
        assert b == l, f"step {step}"  # bit for bit: the bucket changes where bytes live, nothing else
    assert bucket["files"] == local["files"]
    assert {"config.json", "checkpoints", "tensorboard", "samples"} <= set(bucket["files"])
    assert bucket["checkpoints"] == local["checkpoints"] and "4" in bucket["checkpoints"]
    assert bucket["export"] == local["export"] == ["model.json", "params", "text_encoder"]
    assert bucket["run"] == 4
    np.testing.assert_array_equal(np.asarray(bucket["image"]), np.asarray(local["image"]))
    assert bucket["diffusers"] == local["diffusers"] and "config.json" in bucket["diffusers"]


def test_a_damaged_checkpoint_in_a_bucket_falls_back_and_an_existing_output_is_refused(bucket_and_local_runs):
    result = bucket_and_local_runs
    fallback = result["fallback"]
    assert fallback["damaged_files"] > 0
    # Checkpoint 4 was unreadable: the run went on from 2, retraining steps 3 and 4 as before, to 6.
    assert len(fallback["losses"]) == 4 and fallback["losses"][:2] == result["bucket"]["losses"][2:]
    assert fallback["checkpoints"][-1] == "6"
    assert f"gs://{BUCKET}/export" in result["refused"] and "--force" in result["refused"]


def test_a_bucket_that_does_not_exist_is_one_line_before_any_work(tmp_path):
    with fake_gcs() as env:
        result = subprocess.run([sys.executable, "-m", "s2flash_jax.cli", "train", "--config", "configs/tiny.py",
                                 "--out", "gs://no-such-bucket/run"], cwd=REPO, capture_output=True, text=True,
                                env={**fake_devices_env(1), **env}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "s2flash train: error: bucket gs://no-such-bucket does not exist, or these credentials cannot see it"]
