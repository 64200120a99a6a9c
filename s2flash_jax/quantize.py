"""Weight-only int8 / int4 post-training quantization of a finished model, with qwix, selectively.

`s2flash quantize CKPT --bits {8,4} [--keep PATTERN ...] --out OUT` writes a quantized model checkpoint.

What is quantized: the kernel of every linear layer of the SANA transformer (a "layer" is named by
its '/'-joined module path, e.g. `transformer_blocks/attn1/to_q`, `time_embed/linear`, `proj_out`;
a block layer's name covers that layer in every block, since the blocks' weights are stacked for the
scan and quantized as one array). Each kernel [..., in, out] is quantized symmetrically, absmax per
output channel (and per block): int = round(w / s) clipped to the type's range, s = max|w| over the
input axis / 127.5 (int8) or / 7.5 (int4) (qwix's bound, which uses the top bucket in full). Biases,
norms, modulation tables, the depthwise 3x3 convolution (a sum of shifted copies, not a matmul qwix
sees) and every layer `keep` matches stay as they are. Activations stay in the compute dtype
(weight-only: no calibration data).

`keep`: glob patterns over layer names (fnmatch: `*` crosses '/'), or regexes with a `re:` prefix,
fully matched. Each must match at least one layer. The default is the backbone kind's
quantization_keep (SANA's: models/sana.py QUANTIZATION_KEEP; see there why).
LoRA adapters are folded into their kernels first (the quantized model has none).

Format of a quantized checkpoint (an ordinary model checkpoint directory, model_checkpoint.py):
  model.json   the source's fields (model config without LoRA keys, components, sampling) plus
               "quantization": {"bits": 8 | 4, "keep": [patterns as given], "layers": [the
               quantized layers], "method": METHOD, "source": path it was quantized from}
  params/      orbax tree as the source's, except that each quantized layer's `kernel` is qwix's
               quantized array, laid out as `qwix.quantize_params` lays out an NNX model:
                 <layer>/kernel/array/qvalue  int8 or int4, the kernel's shape ([L, in, out] in blocks)
                 <layer>/kernel/array/scale   the kernel's dtype, [..., 1, out] (one per channel)
               kernel ≈ qvalue · scale. Every other parameter is stored unchanged (bit-identical).
  ...          the source's components (text_encoder/), copied

Loading (`TextToImage.load`, `s2flash sample --ckpt`, `s2flash eval`) runs quantized matmuls through
qwix: the weights stay int8/int4 in device memory and each matmul dequantizes its kernel inside the
compiled computation (qwix's weight-only path, which XLA fuses into the dot). qwix's own way of
quantizing an NNX model (run it once; each Param is replaced the first time a matmul reads it)
cannot reach the SANA blocks, whose stacked weights are sliced inside a `jax.lax.scan`: a
replacement made inside the scan is lost, and qwix's sharding bookkeeping trips on the stacked
`layers` axis. So `install_quantized` replaces the kernels itself, before any call, with the objects
qwix would create (`WithAux(QArray)`, each block's `HowToQuantize`), which the scan slices block by
block like any parameter; and qwix's `PtqProvider` intercepts the model's matmuls, one rule naming
the quantized layers sending theirs through `qwix.dot_general`. Where JAX cannot pass int4 arrays to
compiled executables (its CPU backend, see native_int4), int4 values are held in int8 containers
in memory; on disk they are int4 either way.

Export (`s2flash convert export`) writes the dequantized model: diffusers' `SanaTransformer2DModel`
has no int8/int4 form without extra libraries, so each quantized kernel is written as qvalue · scale
in the scale's dtype (or --dtype), a plain float diffusers folder that computes what the quantized
JAX model computes; it is as large as the unquantized export.

A quantized checkpoint cannot be trained from (model_checkpoint.load_params refuses it).

Sensitivity: `layer_sensitivity` quantizes one group of layers at a time (the kind's sensitivity_groups) and
measures how far the sampled latents move from the unquantized model's on fixed inputs;
`most_sensitive` picks the groups to keep.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx, traverse_util
from qwix._src.core.qarray import HowToQuantize, QArray
# WithAux is what qwix's PTQ provider recognises as an already-quantized weight (not exported by qwix).
from qwix._src.providers.ptq import WithAux
from qwix._src.utils.flax_util import update_boxed

from s2flash_jax.model_checkpoint import (
    CheckpointError, copy_components, extra_metadata, load_params, read_metadata, read_model_config,
    read_stored_params, save_model, stored_params)
from s2flash_jax.models.backbone import Backbone, BackboneConfig, abstract_backbone, build_backbone, kind_of
from s2flash_jax.models.lora import merge_lora
from s2flash_jax.outputs import OutputExists, refuse_existing_output
from s2flash_jax.precision import FP32, Precision
from s2flash_jax.sampling import few_step_sample
from s2flash_jax.storage import resolve


QTYPES = {8: jnp.int8, 4: jnp.int4}
METHOD = "qwix-ptq weight-only, per-channel absmax"
KEY = "quantization"  # model.json key of a quantized checkpoint
QVALUE, SCALE = "array/qvalue", "array/scale"  # under a quantized layer's kernel
class QuantizationError(CheckpointError):
    """Quantization that cannot be done as asked; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized: bits (8 or 4); keep: the patterns as given; layers: the
    quantized layers ('/'-joined module paths)."""

    bits: int
    keep: tuple[str, ...]
    layers: tuple[str, ...]

    @property
    def qtype(self):
        return QTYPES[self.bits]

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "keep": list(self.keep), "layers": list(self.layers), "method": METHOD}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], where: str) -> Quantization:
        if entry.get("method") != METHOD or entry.get("bits") not in QTYPES or not entry.get("layers"):
            raise QuantizationError(f"{where}: quantization {dict(entry)!r} is not one this version reads "
                                    f"(expected method {METHOD!r}, bits 8 or 4 and the quantized layers)")
        return cls(entry["bits"], tuple(entry.get("keep", ())), tuple(entry["layers"]))


# ---------------------------------------------------------------------------------------- layers


def linear_layers(model: nnx.Module) -> dict[str, nnx.Linear]:
    """'/'-joined module path -> every linear layer of `model` (stacked block layers once)."""
    return {"/".join(map(str, path)): module for path, module in nnx.iter_modules(model)
            if isinstance(module, nnx.Linear)}


def layer_names(config: BackboneConfig) -> tuple[str, ...]:
    """The linear layers of the transformer `config` builds, sorted; nothing is allocated."""
    return tuple(sorted(linear_layers(abstract_backbone(config))))


def matches(name: str, pattern: str) -> bool:
    """A glob over layer names (`*` crosses '/'), or with a `re:` prefix a fully matched regex."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as e:
            raise QuantizationError(f"--keep {pattern!r} is not a valid regular expression: {e}") from e
    return fnmatch.fnmatchcase(name, pattern)


def default_keep(config: BackboneConfig) -> tuple[str, ...]:
    """The layer patterns kept in full precision unless --keep says otherwise (the backbone kind's)."""
    return kind_of(config).quantization_keep


def plan(config: BackboneConfig, bits: int, keep: Sequence[str] | None = None) -> Quantization:
    """The Quantization of `config`'s layers at `bits`, keeping the layers `keep` matches (None:
    default_keep); each pattern must match a layer and at least one layer must be left to quantize."""
    keep = default_keep(config) if keep is None else keep
    if bits not in QTYPES:
        raise QuantizationError(f"--bits {bits}: expected one of {sorted(QTYPES, reverse=True)} (int8 or int4 weights)")
    names = layer_names(config)
    unmatched = [p for p in keep if not any(matches(n, p) for n in names)]
    if unmatched:
        raise QuantizationError(f"--keep {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} "
                                f"no layer; layers are named {', '.join(names)}")
    layers = tuple(n for n in names if not any(matches(n, p) for p in keep))
    if not layers:
        raise QuantizationError(f"--keep {', '.join(map(repr, keep))} keeps every layer: nothing is left to quantize")
    return Quantization(bits, tuple(keep), layers)


# ------------------------------------------------------------------------------ quantized model


def quantize_kernel(kernel: jax.Array, qtype) -> QArray:
    """kernel [..., in, out] -> QArray: qvalue `qtype` [..., in, out], scale [..., 1, out] in the
    kernel's dtype; absmax per output channel and per leading (block) index."""
    contraction = kernel.ndim - 2
    return qwix.quantize(kernel, qtype, channelwise_axes=tuple(a for a in range(kernel.ndim) if a != contraction))


@functools.cache
def native_int4() -> bool:
    """Whether int4 arrays can be arguments of ahead-of-time compiled executables here (TextToImage
    compiles that way). JAX 0.10's CPU backend cannot: its executables expect a packed int4 layout
    while its arrays report an unpacked one, and every call fails the layout check."""
    x = jax.device_put(jnp.zeros((2, 2), jnp.int4), jax.devices()[0])
    try:
        jax.jit(lambda v: v.astype(jnp.float32)).lower(x).compile()(x)
    except ValueError:
        return False
    return True


def qvalue_dtype(bits: int):
    """The dtype int values of `bits` are held in, in memory: int8, or int4 where native_int4(); else
    int4 values sit in int8 containers (qwix's QArray keeps qtype int4: same values, same matmuls),
    which costs nothing on XLA:CPU, which stores int4 one value per byte anyway."""
    return QTYPES[bits] if bits == 8 or native_int4() else jnp.int8


def _quantized_param(kernel: nnx.Param, bits: int) -> WithAux:
    """The WithAux(QArray) qwix's PTQ provider puts in place of a kernel Param (qvalue and scale are
    Params with the kernel's metadata, the scale's size-1 axis unsharded)."""
    qtype = QTYPES[bits]
    q = quantize_kernel(kernel.get_value(), qtype)
    qvalue = q.qvalue.astype(qvalue_dtype(bits))
    # What a block's matmul sees inside the scan: one [in, out] kernel, scaled per output channel.
    how = HowToQuantize(qtype=qtype, channelwise_axes=(1,))
    return WithAux(QArray(update_boxed(kernel, value=qvalue), update_boxed(kernel, value=q.scale), qtype=qtype), how)


def install_quantized(model: Backbone, quantization: Quantization) -> None:
    """In place: every layer of `quantization` gets its kernel quantized (see _quantized_param)."""
    layers = linear_layers(model)
    missing = sorted(set(quantization.layers) - set(layers))
    if missing:
        raise QuantizationError(f"the model has no layers {missing}")
    for name in quantization.layers:
        if not isinstance(layers[name].kernel, nnx.Param):
            raise QuantizationError(f"layer {name} is already quantized")
        if type(layers[name]) is not nnx.Linear:
            raise QuantizationError(f"layer {name} is a {type(layers[name]).__name__}; fold its adapters first "
                                    "(models/lora.py merge_lora)")
        layers[name].kernel = _quantized_param(layers[name].kernel, quantization.bits)


def intercepted(model: Backbone, quantization: Quantization) -> nnx.Module:
    """A copy of `model` (its layers already installed) whose calls run the quantized layers' matmuls
    through qwix (PtqProvider); the other layers' matmuls are left alone."""
    rule = qwix.QuantizationRule(module_path="|".join(map(re.escape, quantization.layers)), op_names=("dot_general",),
                                 weight_qtype=quantization.qtype)
    # The weights are quantized already, so qwix's initial forward pass has nothing to do.
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), skip_nnx_init=True)


def quantize_transformer(model: Backbone, quantization: Quantization) -> nnx.Module:
    """The quantized model of a float backbone (without LoRA adapters); `model` is unchanged.
    Called like `model` (few_step_sample, TextToImage); nnx.state holds int8/int4 qvalues."""
    copy = nnx.clone(model)
    install_quantized(copy, quantization)
    return intercepted(copy, quantization)


def abstract_quantized_model(config: BackboneConfig, quantization: Quantization, precision: Precision = FP32) -> nnx.Module:
    """The quantized model's structure with ShapeDtypeStructs for weights: what load_params fills."""

    def build():
        model = build_backbone(config, precision=precision, rngs=nnx.Rngs(0))
        install_quantized(model, quantization)
        return intercepted(model, quantization)

    return nnx.eval_shape(build)


def stored_form(quantized: nnx.Module, quantization: Quantization) -> dict[str, Any]:
    """The quantized model's parameters as a checkpoint stores them: a nested dict (nnx.to_pure_dict
    layout) whose qvalues have the quantization's type (int4 on disk whatever holds them in memory)."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(quantized, nnx.Param)), sep="/")
    for layer in quantization.layers:
        key = f"{layer}/kernel/{QVALUE}"
        flat[key] = flat[key].astype(quantization.qtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def param_bytes(params: Any) -> int:
    """Bytes of a tree of arrays at their storage width: int4 counts half a byte (accelerators pack
    two per byte; XLA:CPU and the checkpoint files hold one per byte)."""
    bits = sum(int(np.prod(x.shape)) * (4 if x.dtype == jnp.int4 else 8 * np.dtype(x.dtype).itemsize)
               for x in jax.tree.leaves(params))
    return bits // 8


# ----------------------------------------------------------------------------------- checkpoints


def read_quantization(path: str | Path) -> Quantization | None:
    """The checkpoint's quantization (model.json "quantization"), None for a float checkpoint."""
    entry = read_metadata(path).get(KEY)
    return None if entry is None else Quantization.from_json(entry, f"{path}/model.json")


def _stored_precision(path: Path) -> Precision:
    """Parameters in the one float dtype the checkpoint stores them in (so kept layers stay
    bit-identical, dtype included), float32 if it mixes dtypes; computation in float32."""
    dtypes = {np.dtype(s.dtype).name for s in stored_params(path).values()}
    uniform = dtypes.pop() if len(dtypes) == 1 else None
    return Precision(param_dtype=uniform if uniform in ("float32", "bfloat16", "float16") else "float32",
                     compute_dtype="float32")


def load_float_model(path: str | Path) -> Backbone:
    """The float model of an unquantized checkpoint, its LoRA adapters (if any) folded in."""
    path = Path(path)
    quantization = read_quantization(path)
    if quantization is not None:
        raise QuantizationError(f"{path} is already quantized ({quantization.bits}-bit); quantize the checkpoint "
                                f"it was made from instead")
    config, precision = read_model_config(path), _stored_precision(path)
    graphdef, abstract = nnx.split(abstract_backbone(config, precision))
    merged_config, params = merge_lora(config, load_params(path, config, abstract))
    if merged_config is not config:  # adapters folded: the plain architecture's graph
        graphdef = nnx.graphdef(abstract_backbone(merged_config, precision))
    return nnx.merge(graphdef, params)


def load_quantized(path: str | Path, precision: Precision = FP32) -> nnx.Module:
    """The quantized model of a quantized checkpoint (on the default device)."""
    quantization = read_quantization(path)
    if quantization is None:
        raise QuantizationError(f"{path} is not quantized (its model.json has no {KEY!r})")
    config = read_model_config(path)
    graphdef, abstract = nnx.split(abstract_quantized_model(config, quantization, precision))
    return nnx.merge(graphdef, load_params(path, config, abstract, quantized=True))


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    quantization: Quantization
    bytes_before: int  # parameter bytes of the source (LoRA adapters folded in)
    bytes_after: int


def quantize_checkpoint(ckpt: str | Path, out: str | Path, *, bits: int, keep: Sequence[str] | None = None,
                        force: bool = False) -> QuantizeResult:
    """`s2flash quantize`: write the quantized model of the checkpoint `ckpt` to `out` (see the module
    docstring for the format), its components copied. keep None: default_keep. `out` appears only
    when complete; an existing one is refused unless force."""
    ckpt, out = resolve(ckpt), resolve(out)
    extra = extra_metadata(ckpt)
    if out.exists() and out.resolve() == ckpt.resolve():
        raise OutputExists(f"--out {str(out)!r} is the checkpoint being quantized; write elsewhere")
    refuse_existing_output(out, force=force)  # before minutes of work; save_model checks again
    model = load_float_model(ckpt)
    quantization = plan(model.config, bits, None if keep is None else tuple(keep))
    params = stored_form(quantize_transformer(model, quantization), quantization)
    save_model(out, model.config, params, force=force, write_components=copy_components(ckpt),
               metadata={**extra, KEY: {**quantization.to_json(), "source": str(ckpt)}})
    return QuantizeResult(quantization, param_bytes(nnx.state(model, nnx.Param)), param_bytes(params))


def dequantized_stored_params(path: str | Path) -> dict[str, jax.ShapeDtypeStruct]:
    """stored_params(path) as the dequantized model's: each quantized kernel (qvalue + scale) listed
    as its `kernel`, with the qvalue's shape and the scale's dtype. A float checkpoint's unchanged."""
    stored = stored_params(path)
    view = {}
    for name, spec in stored.items():
        if name.endswith("/" + QVALUE):
            kernel = name.removesuffix("/" + QVALUE)
            view[kernel] = jax.ShapeDtypeStruct(spec.shape, stored[f"{kernel}/{SCALE}"].dtype)
        elif not name.endswith("/" + SCALE):
            view[name] = spec
    return view


def read_dequantized_params(path: str | Path, names: Sequence[str],
                            read: Callable[[Path, list[str]], dict[str, np.ndarray]] = read_stored_params
                            ) -> dict[str, np.ndarray]:
    """read(path, names) (read_stored_params) with names from dequantized_stored_params: a quantized
    kernel is read as its qvalue and scale and returned dequantized (qwix.dequantize: qvalue · scale)."""
    quantization = read_quantization(path)
    kernels = {f"{layer}/kernel" for layer in (quantization.layers if quantization else ())}
    parts = {n: [f"{n}/{QVALUE}", f"{n}/{SCALE}"] if n in kernels else [n] for n in names}
    values = read(path, [p for ps in parts.values() for p in ps])
    return {n: np.asarray(qwix.dequantize(QArray(*(values[p] for p in ps)))) if n in kernels else values[n]
            for n, ps in parts.items()}


# ------------------------------------------------------------------------------------ sensitivity


@dataclasses.dataclass(frozen=True)
class SweepInputs:
    """Fixed sampling inputs: noise [B, h, w, C] (unit scale), caption [B, L, Cc], caption_mask [B, L],
    and how to sample (few_step_sample's settings; the key is fixed)."""

    noise: jax.Array
    caption: jax.Array
    caption_mask: jax.Array
    guidance_scale: float
    flow_shift: float = 1.0
    steps: int = 1
    null_caption: jax.Array | None = None


def sample(model: nnx.Module, inputs: SweepInputs) -> jax.Array:
    """Latents [B, h, w, C] that `model` samples from `inputs` (compiled)."""

    @nnx.jit
    def run(model):
        return few_step_sample(model, inputs.noise, inputs.caption, inputs.caption_mask, jax.random.key(0),
                               steps=inputs.steps, guidance_scale=inputs.guidance_scale, flow_shift=inputs.flow_shift,
                               null_caption=inputs.null_caption)

    return run(model)


def relative_mse(x: jax.Array, reference: jax.Array) -> float:
    """mean((x − reference)²) / mean(reference²)."""
    x, reference = jnp.asarray(x, jnp.float32), jnp.asarray(reference, jnp.float32)
    return float(jnp.mean(jnp.square(x - reference)) / jnp.mean(jnp.square(reference)))


def layer_sensitivity(model: Backbone, inputs: SweepInputs, bits: int,
                      groups: Sequence[str] | None = None) -> dict[str, float]:
    """For each group (a keep pattern; None: the backbone kind's sensitivity_groups) that matches a
    layer of the float `model`: the relative MSE of
    the latents sampled from `inputs` with only that group quantized to `bits`, against `model`'s.
    Returns {group: relative MSE}, most sensitive first."""
    groups = kind_of(model.config).sensitivity_groups if groups is None else groups
    names = sorted(linear_layers(model))
    reference = sample(model, inputs)
    result = {}
    for group in groups:
        layers = tuple(n for n in names if matches(n, group))
        if layers:
            result[group] = relative_mse(sample(quantize_transformer(model, Quantization(bits, (), layers)), inputs),
                                         reference)
    return dict(sorted(result.items(), key=lambda item: -item[1]))


def most_sensitive(sensitivity: Mapping[str, float], k: int) -> tuple[str, ...]:
    """The k groups of a layer_sensitivity result that moved the output most: patterns for `keep`."""
    return tuple(sorted(sensitivity, key=lambda group: -sensitivity[group])[:k])
