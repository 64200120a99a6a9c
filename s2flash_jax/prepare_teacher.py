"""`s2flash prepare-teacher`: any SANA flow checkpoint -> a teacher SANA-Sprint can distil from.

SANA-Sprint's teacher differs from base SANA in two ways (shared/reference/sana_sprint.md §3.3, §6):
QK RMSNorm in every attention, and the dense time embedding (its embedder fed flow time s, not
1000·s), both of which keep the sCM JVP bounded. Neither is a reparameterisation of the same
function (normalised keys reweight the linear attention's tokens; the sinusoid of s is not the
sinusoid of 1000·s), so the converted weights are fine-tuned with flow matching, in the stages of
the reference: the time embedding (with the new norms) first, everything else held; then all
layers, with the learning rate warmed up from 0.

WORK/ (default OUT-work; rerunning the command resumes)
  prepare.json    what is being prepared from what (a rerun with other inputs is refused)
  converted/      model checkpoint: the new architecture, the original's weights, new norms at 1
  embedding/      stage-1 run (`s2flash train` layout), embedding/model its product
  full/           stage-2 run, full/model
  report.json     velocity distance to the original at each point (also in OUT/model.json)
OUT: the prepared teacher, a model checkpoint that carries the original's other components
(text encoder, sampling defaults) and records `prepared_from` and the report.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2flash_jax.config import Config, ConfigError
from s2flash_jax.data.pipeline import first_batch
from s2flash_jax.flows.flow_matching import standard_normal
from s2flash_jax.model_checkpoint import CheckpointError, load_params, read_metadata, read_model_config, save_model
from s2flash_jax.models.backbone import BackboneConfig, abstract_backbone, build_backbone
from s2flash_jax.outputs import OutputExists, fresh_output_dir
from s2flash_jax.parallel.mesh import make_mesh, tree_shardings
from s2flash_jax.train.loop import train_and_export
from s2flash_jax.recipes.common import copy_shared
from s2flash_jax.storage import resolve

def prepared_architecture(source: BackboneConfig, config) -> BackboneConfig:
    """The teacher architecture `source` becomes: its own with the prepare_teacher section's qk_norm
    and timestep_scale. config: PrepareTeacherConfig."""
    if source.guidance_embeds or source.twinflow_embeds or source.logvar_head:
        raise CheckpointError("prepare-teacher takes a flow model (guidance_embeds, twinflow_embeds and logvar_head "
                              "all False); this checkpoint is a distilled student")
    prepared = dataclasses.replace(source, qk_norm=config.qk_norm, timestep_scale=config.timestep_scale)
    if prepared == source:
        raise CheckpointError(f"the checkpoint already has qk_norm={source.qk_norm!r} and timestep_scale="
                              f"{source.timestep_scale}: it is a teacher as it is; nothing to prepare")
    return prepared


def converted_params(source: Path, source_config: BackboneConfig, prepared: BackboneConfig, config: Config, mesh) -> nnx.State:
    """The prepared architecture holding every weight of the checkpoint at `source`, created in its
    shards; the parts the original lacks (QK norms) keep their initialisation, 1."""
    def abstract(model):
        return nnx.state(abstract_backbone(model, config.precision))

    original = abstract(source_config)
    loaded = load_params(source, source_config, original, tree_shardings(original, mesh))
    target = abstract(prepared)
    with jax.set_mesh(mesh):
        return jax.jit(lambda weights: copy_shared(weights, nnx.state(build_backbone(prepared, precision=config.precision, rngs=nnx.Rngs(config.seed)))),
            out_shardings=tree_shardings(target, mesh))(loaded)


def stage_configs(config: Config, prepared: BackboneConfig, work: Path) -> dict[str, Config]:
    """The flow-matching runs of stage 1 (embedding) and stage 2 (full) that have steps, each
    starting from the product of the one before (the first from work/converted)."""
    p = config.prepare_teacher
    base = dataclasses.replace(config, model=prepared, teacher=None, recipe="flow_matching")
    stages = {"embedding": dict(steps=p.embedding_steps, trainable=tuple(p.embedding_trainable), schedule="constant"),
              "full": dict(steps=p.full_steps, trainable=(), warmup_steps=p.full_warmup_steps)}
    configs, start = {}, work / "converted"
    for name, settings in stages.items():
        if settings["steps"]:
            train = dataclasses.replace(base.train, init_checkpoint=str(start), **settings)
            configs[name], start = dataclasses.replace(base, train=train), work / name / "model"
    return configs


def velocity_report(config: Config, source: Path, checkpoints: dict[str, Path], mesh) -> dict[str, Any]:
    """How far each checkpoint's velocity is from the original's on fixed held-out points, and how
    well each fits the data there.

    For examples x0 (prepare_teacher.eval_path, else the training data), fixed noise ε and times
    s_k = (k + 1/2)/K: rel_mse = Σ‖v − v_orig‖² / Σ‖v_orig‖² and flow_mse = mean (v − (ε − x0))²,
    overall and per time (conditional captions). The original is fed its own time convention.
    """
    p = config.prepare_teacher
    source_config = read_model_config(source)
    data = config.data if not p.eval_path else dataclasses.replace(config.data, path=p.eval_path)
    batch = first_batch(data, p.eval_examples, seed=config.seed + 1,
                        latent_shape=(source_config.sample_size, source_config.sample_size, source_config.in_channels),
                        caption_length=config.data.caption_length, caption_dim=source_config.caption_channels)
    x0, caption, mask = (jnp.asarray(batch[k]) for k in ("latents", "caption", "caption_mask"))
    noise = standard_normal(jax.random.key(config.sample.seed), x0.shape)
    times = (jnp.arange(p.eval_times) + 0.5) / p.eval_times

    def velocities(ckpt: Path) -> jax.Array:
        model_config = read_model_config(ckpt)
        model = abstract_backbone(model_config, config.precision)
        graph, abstract = nnx.split(model)
        params = load_params(ckpt, model_config, abstract, tree_shardings(abstract, mesh))

        @jax.jit
        def run(params):
            net = nnx.merge(graph, params)

            def at(s):
                x_s = (1 - s) * x0 + s * noise
                return net(x_s, jnp.full((x0.shape[0],), s), caption, mask)

            return jax.lax.map(at, times)  # [K, B, H, W, C]

        with jax.set_mesh(mesh):
            return run(params)

    def per_time(squares: jax.Array) -> np.ndarray:  # [K, B, ...] -> [K]
        return np.asarray(jnp.mean(squares.reshape(squares.shape[0], -1), axis=1))

    target = noise - x0
    original = velocities(source)
    original_power = per_time(original**2)
    rows = {"original": {"flow_mse": float(per_time((original - target) ** 2).mean()),
                         "flow_mse_per_time": per_time((original - target) ** 2).tolist()}}
    for name, ckpt in checkpoints.items():
        v = velocities(ckpt)
        distance = per_time((v - original) ** 2)
        rows[name] = {"rel_mse": float(distance.sum() / original_power.sum()),
                      "rel_mse_per_time": (distance / original_power).tolist(),
                      "flow_mse": float(per_time((v - target) ** 2).mean()),
                      "flow_mse_per_time": per_time((v - target) ** 2).tolist()}
    return {"times": np.asarray(times).tolist(), "examples": p.eval_examples,
            "held_out": bool(p.eval_path), "models": rows}


def report_table(report: dict[str, Any]) -> str:
    lines = ["| model | velocity distance to the original (rel. MSE) | flow-matching MSE |", "|---|---|---|"]
    for name, row in report["models"].items():
        distance = "" if name == "original" else f"{row['rel_mse']:.4f}"
        lines.append(f"| {name} | {distance} | {row['flow_mse']:.4f} |")
    where = "held-out examples" if report["held_out"] else "training examples (set prepare_teacher.eval_path)"
    return "\n".join(lines) + f"\n\n{report['examples']} {where} x {len(report['times'])} flow times.\n"


def run_prepare_teacher(config: Config, source: str | Path, out: str | Path, *, work: str | Path | None = None,
                        force: bool = False) -> dict[str, Any]:
    """Prepare the flow model at `source` into the teacher checkpoint `out` (see the module
    docstring); returns the report. config: data, mesh, precision, train.*, flow_matching.* and
    prepare_teacher.* of the fine-tuning (its model and teacher are not used)."""
    source, out = resolve(source), resolve(out)
    work = resolve(work) if work is not None else out.with_name(out.name + "-work")
    if jax.process_count() > 1:
        raise ConfigError("prepare-teacher runs in one process for now (its checkpoint writes are single-host)")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExists(f"--out {str(out)!r} already exists; pass --force to replace it")
    source_meta = read_metadata(source)
    source_config = read_model_config(source)
    prepared = prepared_architecture(source_config, config.prepare_teacher)
    if force and work.exists():
        shutil.rmtree(work)
    _claim(work, {"source": str(source.absolute()), "prepared": dataclasses.asdict(prepared),
                  "prepare_teacher": dataclasses.asdict(config.prepare_teacher)})
    print(f"prepare-teacher: {source} -> {out}: qk_norm {source_config.qk_norm!r} -> {prepared.qk_norm!r}, time "
          f"embedder fed {source_config.flow_time_scale:g}·s -> {prepared.flow_time_scale:g}·s; working in {work}",
          flush=True)
    mesh = make_mesh(config.mesh)
    if not (work / "converted" / "model.json").is_file():
        save_model(work / "converted", prepared, converted_params(source, source_config, prepared, config, mesh),
                   force=True)
    checkpoints = {"converted": work / "converted"}
    for name, stage in stage_configs(config, prepared, work).items():
        checkpoints[name] = train_and_export(f"prepare-teacher {name} stage", stage, work / name)

    report = velocity_report(config, source, checkpoints, mesh)
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report_table(report))
    extra = {k: v for k, v in source_meta.items() if k not in ("format", "version", "model")}
    with fresh_output_dir(out, force=force) as staging:
        shutil.copytree(list(checkpoints.values())[-1] / "params", staging / "params")
        for component in source.iterdir():  # the original's text encoder and other parts
            if component.name not in ("model.json", "params"):
                (shutil.copytree if component.is_dir() else shutil.copy2)(component, staging / component.name)
        meta = {"format": source_meta["format"], "version": source_meta["version"],
                "model": dataclasses.asdict(prepared), **extra, "prepared_from": str(source.absolute()),
                "preparation": {name: report["models"][name] for name in report["models"]}}
        (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote the prepared teacher {out}")
    return report


def _claim(work: Path, inputs: dict[str, Any]) -> None:
    """Mark `work` as this preparation's, or refuse one that holds another."""
    inputs = json.loads(json.dumps(inputs))  # tuples as the lists the marker holds
    marker = work / "prepare.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != inputs:
            raise OutputExists(f"{work} holds the work of another preparation (other source or settings); pass "
                               "--force to start over")
        return
    if work.exists() and any(work.iterdir()):
        raise OutputExists(f"{work} exists and is not a prepare-teacher working directory; choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(inputs, indent=2) + "\n")

