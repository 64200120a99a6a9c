"""The performance suite's measuring parts (FLOP count, MFU, peak memory, shapes by platform, the
markdown report) and, marked slow, the whole suite on the smallest shapes. No timing is asserted."""

import dataclasses
import functools
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks import report, shapes
from s2flash_jax.train.flops import matmul_flops, model_flops_utilisation
from benchmarks.memory import TorchPeak, jax_peak_bytes
from s2flash_jax.models.sana import SanaTransformer
from tests.conftest import REPO


def test_matmul_flops_counts_products_convolutions_and_every_scan_iteration():
    a, b = jnp.zeros((3, 4)), jnp.zeros((4, 5))
    assert matmul_flops(jnp.matmul, a, b) == 2 * 3 * 4 * 5
    batched = jnp.zeros((7, 3, 4)), jnp.zeros((7, 4, 5))
    assert matmul_flops(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), *batched) == 7 * 2 * 3 * 4 * 5
    square = jnp.zeros((4, 4))
    assert matmul_flops(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=9)[0], square) \
        == 9 * 2 * 4 * 4 * 4
    assert matmul_flops(jax.jit(lambda x: jax.lax.cond(True, lambda: x @ x, lambda: x), inline=False), square) \
        == 2 * 4 * 4 * 4
    # 1-D convolution: [N=2, W=10, C=3] with a 5-tap kernel to 4 features, "SAME": each of the 2*10*4 outputs
    # takes 5*3 multiply-adds.
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))  # noqa: E731
    assert matmul_flops(conv, jnp.zeros((2, 10, 3)), jnp.zeros((5, 3, 4))) == 2 * (2 * 10 * 4) * (5 * 3)


def build(config):
    return SanaTransformer(config, rngs=nnx.Rngs(0))


def apply(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def test_flops_of_the_scanned_sana_blocks_grow_with_the_layer_count():
    base = shapes.model_pair(shapes.PRESETS["smoke"])[1]
    counts = []
    for layers in (1, 3):
        config = dataclasses.replace(base, num_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(functools.partial(build, config)))  # shapes only
        args = (jnp.zeros((1, 8, 8, 4)), jnp.ones((1,)), jnp.zeros((1, 8, 32)), jnp.ones((1, 8), jnp.int32))
        counts.append(matmul_flops(functools.partial(apply, graphdef), state, *args))
    per_block = (counts[1] - counts[0]) / 2
    assert per_block > 0 and counts[0] > per_block  # embedding, caption projection and output are outside the scan


def test_mfu_divides_achieved_flops_by_the_devices_peak():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert model_flops_utilisation(989e12 * 0.25, 1.0, h100) == pytest.approx(0.25)
    v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
    assert model_flops_utilisation(197e12, 2.0, v5e) == pytest.approx(0.5)
    assert model_flops_utilisation(1e9, 1.0, jax.devices("cpu")[0]) is None


def test_jax_peak_on_cpu_is_the_compiled_steps_buffers():
    compiled = jax.jit(lambda x: x @ x).lower(jnp.zeros((256, 256))).compile()
    size, how = jax_peak_bytes([compiled])
    assert size >= 2 * 256 * 256 * 4 and "XLA buffer assignment" in how  # the argument and the result


def test_torch_peak_on_cpu_counts_live_tensors_and_the_highest_point_of_the_block():
    kept = []
    with TorchPeak("cpu", live_before=1000) as peak:
        kept.append(torch.empty(1 << 18, dtype=torch.float32))  # 1 MiB, still live after the block
        temporary = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, freed inside it
        del temporary
    assert 1000 + 5 * (1 << 20) <= peak.bytes < 1000 + 6 * (1 << 20)


def test_shapes_follow_the_platform():
    assert shapes.choose("auto").name == "cpu"  # the tests run on the CPU backend
    student, teacher = shapes.model_pair(shapes.choose("accelerator"))
    assert (student.inner_dim, student.num_layers, student.sample_size) == (1152, 28, 32)
    assert student.logvar_head and not teacher.logvar_head
    assert not student.gradient_checkpointing and not teacher.gradient_checkpointing
    with pytest.raises(ValueError, match="expected auto or one of"):
        shapes.choose("gpu")


def canned_results(torch_side: bool = True) -> dict:
    device = {"platform": "cpu", "kind": "cpu", "count": 1}
    train = {"describe": "tiny", "batch": 8, "dtype": "float32", "device": device, "generator_loss_max_rel_diff": 3e-6,
             "jax": {"update_ms": {"generator": 100.0, "discriminator": 40.0}, "examples_per_s": 114.3,
                     "peak_bytes": 36 << 20, "peak_measured_as": "XLA", "tflops_per_s": 0.0105,
                     "flops_per_update": {"generator": 8.4e8, "discriminator": 6.3e8}, "mfu": None},
             "torch": {"device": "cpu", "update_ms": {"generator": 250.0, "discriminator": 150.0},
                       "examples_per_s": 40.0, "peak_bytes": 20 << 20, "peak_measured_as": "profiler"},
             "ratio": {"examples_per_s_jax_over_torch": 2.857, "peak_bytes_jax_over_torch": 1.8}}
    sampling = {"describe": "tiny", "batch": 1, "dtype": "float32", "device": device, "one_step_max_rel_diff": 2e-7,
                "rows": [{"steps": n, "jax_ms": n * 1.0, "torch_ms": n * 5.0, "jax_over_torch": 0.2}
                         for n in (1, 2, 4)]}
    if not torch_side:
        train.update(torch=None, ratio=None)
        del train["generator_loss_max_rel_diff"]
        sampling = {**sampling, "rows": [{"steps": n, "jax_ms": 1.0} for n in (1, 2, 4)]}
        del sampling["one_step_max_rel_diff"]
    text_to_image = {**sampling, "components": "Gemma-2 width 32", "one_step_max_abs_diff": 1e-6,
                     "rows": [{"steps": n, "jax_ms": 10.0 * n, "torch_ms": 20.0 * n, "jax_over_torch": 0.5}
                              for n in (1, 2, 4)]}
    if not torch_side:
        text_to_image = {**text_to_image, "rows": [{"steps": n, "jax_ms": 10.0} for n in (1, 2, 4)]}
        del text_to_image["one_step_max_abs_diff"]
    scaling = {"config": "configs/tiny.py", "batch": 16, "steps": 40, "cpu_cores": 2,
               "rows": [{"devices": d, "step_time_s": 0.4, "examples_per_s": 40.0, "vs_1_device": 1.0} for d in (1, 8)]}
    return {"machine": {"date": "today", "device": "1 x cpu (cpu)", "cpu_cores": 2, "load_average": 1.0,
                        "jax": "0.10.2", "torch": "2.13.0", "omp_wait_policy": "PASSIVE"},
            "benchmarks": {"train_step": train, "sampling": sampling, "text_to_image": text_to_image,
                           "scaling": scaling}}


def test_report_has_a_table_per_benchmark_with_the_ratios():
    text = report.markdown(canned_results())
    assert "| JAX / PyTorch | | | 2.86 | 1.80 | | |" in text
    assert "| PyTorch (cpu) | 250.0 | 150.0 | 40.0 | 20.0 MiB | | |" in text
    assert "| 4 | 4.00 | 20 | 0.2 |" in text
    assert "| 8 | 400 | 40.0 | 1.00 |" in text
    assert "| 4 | 40.0 | 80 | 0.5 |" in text and "1-step images agree to 1.0e-06" in text
    assert "n/a (no peak FLOP/s known for this device)" in text


def test_report_without_a_reference_or_with_a_failure_says_so():
    results = canned_results(torch_side=False)
    results["benchmarks"]["scaling"] = {"error": "exit status 1: boom"}
    text = report.markdown(results)
    assert "no PyTorch reference on this platform" in text and "| 1 | 1.00 | n/a | n/a |" in text
    assert "| 4 | 10.0 | n/a | n/a |" in text
    assert "Failed: exit status 1: boom" in text


@pytest.mark.slow
def test_the_suite_writes_json_and_markdown_with_every_benchmark(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--shapes", "smoke", "--repeats", "1",
                           "--scaling-devices", "1", "2", "--scaling-steps", "4", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-5000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert set(suite["benchmarks"]) == {"train_step", "sampling", "text_to_image", "scaling"}
    train, sampling, scaling = (suite["benchmarks"][k] for k in ("train_step", "sampling", "scaling"))
    for side in ("jax", "torch"):
        assert train[side]["examples_per_s"] > 0 and train[side]["peak_bytes"] > 0
        assert all(ms > 0 for ms in train[side]["update_ms"].values())
    assert all(v > 0 for v in train["ratio"].values()) and train["jax"]["tflops_per_s"] > 0
    assert [row["steps"] for row in sampling["rows"]] == [1, 2, 4]
    assert all(row["jax_ms"] > 0 and row["torch_ms"] > 0 and row["jax_over_torch"] > 0 for row in sampling["rows"])
    end_to_end = suite["benchmarks"]["text_to_image"]
    assert [row["steps"] for row in end_to_end["rows"]] == [1, 2, 4] and end_to_end["one_step_max_abs_diff"] < 1e-4
    assert all(row["jax_ms"] > 0 and row["torch_ms"] > 0 for row in end_to_end["rows"])
    assert [row["devices"] for row in scaling["rows"]] == [1, 2]
    assert all(row["examples_per_s"] > 0 and np.isfinite(row["vs_1_device"]) for row in scaling["rows"])
    assert (tmp_path / "suite.md").read_text() == report.markdown(suite)
