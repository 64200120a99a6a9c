"""The suite's results as markdown: one table per benchmark, each saying what was measured where.

Takes the dict benchmarks/suite.py writes to suite.json (so a table can be re-rendered from a saved
file) and never invents a number: a benchmark that failed or did not run says so.
"""

from __future__ import annotations

GIB = 1 << 30


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# s2flash-jax side-by-side benchmarks", "",
             f"Measured {m['date']} on {m['device']}, {m['cpu_cores']} CPU cores (load average {m['load_average']} "
             f"at the start), jax {m['jax']}, torch {m['torch']} (OpenMP wait policy {m['omp_wait_policy']}). "
             f"Ratios are JAX / PyTorch.", ""]
    sections = {"train_step": _train_step, "sampling": _sampling, "text_to_image": _text_to_image,
                "scaling": _scaling}
    for name, render in sections.items():
        if name not in results["benchmarks"]:
            continue
        result = results["benchmarks"][name]
        lines += render(result) if "error" not in result else [f"## {name}", "", f"Failed: {result['error']}"]
        lines.append("")
    return "\n".join(lines)


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _size(size: int | None) -> str:
    if size is None:
        return "n/a"
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / (1 << 20):.1f} MiB"


def _train_step(r: dict) -> list[str]:
    j, t, ratio = r["jax"], r["torch"], r["ratio"]
    mfu = "n/a (no peak FLOP/s known for this device)" if j["mfu"] is None else f"{j['mfu']:.1%}"
    lines = ["## Training step: sCM + LADD, JAX vs PyTorch reference", "",
             f"{r['describe']}; global batch {r['batch']}, {r['dtype']}, on {r['device']['kind']}. An update is "
             f"one phase on one batch; examples/s = batch x updates / time, generator and discriminator "
             f"alternating.", "",
             "| side | generator ms | discriminator ms | examples/s | peak memory | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|",
             f"| JAX | {j['update_ms']['generator']:.1f} | {j['update_ms']['discriminator']:.1f} | "
             f"{j['examples_per_s']:.1f} | {_size(j['peak_bytes'])} | {j['tflops_per_s']:.3g} | {mfu} |"]
    if t is not None:
        lines += [f"| PyTorch ({t['device']}) | {t['update_ms']['generator']:.1f} | "
                  f"{t['update_ms']['discriminator']:.1f} | {t['examples_per_s']:.1f} | {_size(t['peak_bytes'])} | | |",
                  f"| JAX / PyTorch | | | {ratio['examples_per_s_jax_over_torch']:.2f} | "
                  f"{ratio['peak_bytes_jax_over_torch']:.2f} | | |"]
    lines += ["", f"FLOPs per update (matmuls and convolutions, from the JAX step's jaxpr): generator "
              f"{j['flops_per_update']['generator']:.3g}, discriminator {j['flops_per_update']['discriminator']:.3g}. "
              f"Peak memory: JAX {j['peak_measured_as']}"
              + (f"; PyTorch {t['peak_measured_as']}. Generator losses agree with the reference to "
                 f"{r['generator_loss_max_rel_diff']:.1e} (relative)." if t is not None else
                 "; no PyTorch reference on this platform.")]
    return lines


def _sampling(r: dict) -> list[str]:
    torch_side = "torch_ms" in r["rows"][0]
    lines = ["## Sampling latency: JAX student vs the transformer in SanaSprintPipeline", "",
             f"{r['describe']}; batch {r['batch']}, {r['dtype']}, on {r['device']['kind']}; prompt embeddings in, "
             f"latents out (no text encoder, no VAE); median of the runs.", "", *_steps_table(r["rows"], ".2f")]
    if torch_side:
        lines += ["", f"1-step latents agree to {r['one_step_max_rel_diff']:.1e} of max |latent|."]
    return lines


def _text_to_image(r: dict) -> list[str]:
    lines = ["## Prompt to image: `s2flash sample` in JAX vs SanaSprintPipeline", "",
             f"{r['describe']}; {r['components']}; batch {r['batch']}, {r['dtype']}, on {r['device']['kind']}; "
             f"prompts in, images out (Gemma-2, sampling, DC-AE decoding); median of the runs.", "",
             *_steps_table(r["rows"], ".1f")]
    if "one_step_max_abs_diff" in r:
        lines += ["", f"1-step images agree to {r['one_step_max_abs_diff']:.1e} (pixel values in [0, 1])."]
    return lines


def _steps_table(rows: list[dict], jax_format: str) -> list[str]:
    lines = ["| steps | JAX ms | PyTorch ms | JAX / PyTorch |", "|---|---|---|---|"]
    return lines + [f"| {row['steps']} | {row['jax_ms']:{jax_format}} | {_number(row.get('torch_ms'), 4)} | "
                    f"{_number(row.get('jax_over_torch'))} |" for row in rows]


def _scaling(r: dict) -> list[str]:
    lines = ["## Scaling on fake CPU devices", "",
             f"The {r['config']} training loop (data, both phases, metrics), global batch {r['batch']}, "
             f"{r['steps']} steps timed over the second half, on {r['cpu_cores']} CPU cores shared by every fake "
             f"device: a check that sharding works and costs little, not a speed-up claim.", "",
             "| fake devices | step ms | examples/s | vs 1 device |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['devices']} | {row['step_time_s'] * 1e3:.0f} | {row['examples_per_s']:.1f} | "
                     f"{row['vs_1_device']:.2f} |")
    return lines
