"""Tiny random diffusers SANA transformers saved as real checkpoints are (diffusers folders and
original NVlabs files), and the `s2flash convert` command run in-process, for the conversion tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file, save_file

from s2flash_jax.cli import main
from tests.sana_reference import BASE

# name -> diffusers config overrides of tests.sana_reference.BASE (2 blocks, width 32)
CONFIGS = {
    "sprint_student": dict(guidance_embeds=True, qk_norm="rms_norm_across_heads"),
    "sprint_teacher": dict(qk_norm="rms_norm_across_heads", timestep_scale=0.001),
    "posembed_patch2": dict(interpolation_scale=1.0, patch_size=2),
    "bias_affine_channels": dict(attention_bias=True, norm_elementwise_affine=True, out_channels=6,
                                 num_cross_attention_heads=4, cross_attention_head_dim=8, guidance_embeds=True),
}


def random_transformer(overrides: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> SanaTransformer2DModel:
    """Every parameter random (none of init's zeros and ones), in `dtype`."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype)


def save_transformer(model: SanaTransformer2DModel, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder's safetensors files, as saved (no dtype change)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def convert(capsys, *args: str) -> tuple[int, str, str]:
    """Run `s2flash convert ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def oracle_original(sd: dict[str, torch.Tensor], num_layers: int, guidance: bool) -> dict[str, torch.Tensor]:
    """The NVlabs state dict a diffusers one comes from: diffusers' scripts/convert_sana_to_diffusers.py
    read backwards, written out here independently of conversion/ so the two can be checked."""
    time = "time_embed." if guidance else "time_embed.emb."
    linears = {"x_embedder.proj": "patch_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
               "y_embedder.y_proj.fc2": "caption_projection.linear_2", "t_block.1": "time_embed.linear",
               "final_layer.linear": "proj_out", "t_embedder.mlp.0": f"{time}timestep_embedder.linear_1",
               "t_embedder.mlp.2": f"{time}timestep_embedder.linear_2"}
    if guidance:
        linears |= {"cfg_embedder.mlp.0": "time_embed.guidance_embedder.linear_1",
                    "cfg_embedder.mlp.2": "time_embed.guidance_embedder.linear_2"}
    for i in range(num_layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        linears |= {b + "attn.proj": d + "attn1.to_out.0", b + "cross_attn.q_linear": d + "attn2.to_q",
                    b + "cross_attn.proj": d + "attn2.to_out.0", b + "mlp.inverted_conv.conv": d + "ff.conv_inverted",
                    b + "mlp.depth_conv.conv": d + "ff.conv_depth", b + "mlp.point_conv.conv": d + "ff.conv_point"}
    out = {f"{o}.{leaf}": sd[f"{d}.{leaf}"] for o, d in linears.items() for leaf in ("weight", "bias")
           if f"{d}.{leaf}" in sd}
    out |= {"attention_y_norm.weight": sd["caption_norm.weight"], "final_layer.scale_shift_table": sd["scale_shift_table"]}
    for i in range(num_layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "scale_shift_table"] = sd[d + "scale_shift_table"]
        out[b + "attn.qkv.weight"] = torch.cat([sd[d + f"attn1.to_{x}.weight"] for x in "qkv"])
        if d + "attn1.to_q.bias" in sd:  # LiteLA(use_bias=True); no published SANA has it
            out[b + "attn.qkv.bias"] = torch.cat([sd[d + f"attn1.to_{x}.bias"] for x in "qkv"])
        if d + "norm2.weight" in sd:  # norm_elementwise_affine
            out |= {b + f"norm2.{leaf}": sd[d + f"norm2.{leaf}"] for leaf in ("weight", "bias")}
        out[b + "cross_attn.kv_linear.weight"] = torch.cat([sd[d + f"attn2.to_{x}.weight"] for x in "kv"])
        out[b + "cross_attn.kv_linear.bias"] = torch.cat([sd[d + f"attn2.to_{x}.bias"] for x in "kv"])
        for attn, original in (("attn1", "attn"), ("attn2", "cross_attn")):
            for x in "qk":
                if f"{d}{attn}.norm_{x}.weight" in sd:
                    out[f"{b}{original}.{x}_norm.weight"] = sd[f"{d}{attn}.norm_{x}.weight"]
    return out


def write_original(model, path, *, extras=None, safetensors=False):
    """The model as SANA's trainer saves it: {"state_dict": ..., "optimizer": ...}, plus `extras`."""
    state = oracle_original(model.state_dict(), model.config.num_layers, model.config.guidance_embeds)
    state.update(extras or {})
    if safetensors:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state, "optimizer": {"state": {}}, "epoch": 3}, path)
    return path


def write_config(model, path):
    path.write_text(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))
    return path
