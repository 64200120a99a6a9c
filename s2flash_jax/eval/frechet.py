"""A Fréchet distance for the shapes dataset, in the feature space of a small classifier trained on it.

FID compares Gaussians fitted to Inception features; Inception knows nothing of 32 px shapes, so
here the features are the penultimate activations of a small CNN trained on renders to say, for
every colour present, its shape, size and grid cell (multi-hot targets over colour x shape,
colour x size and colour x position). Its features therefore encode exactly the attributes
prompts ask for, and how cleanly an image shows them.

The trained net is a cache: `save_feature_net` writes one msgpack file (config and weights)
atomically, `load_feature_net` reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

from s2flash_jax.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, heldout_scenes, render_batch, scenes
from s2flash_jax.eval.inception import crop_patches

LABELS: tuple[str, ...] = tuple(f"{colour} {attribute}" for colour in COLOURS
                                for attribute in SHAPES + SIZES + POSITIONS)  # "red circle", "red big", "red top left", ...
FILE_FORMAT = "s2flash-feature-net"
_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
    """size: image side in pixels; channels: those of each stride-2 convolution; features: F."""

    size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    features: int = 64

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        downsampling = 2 ** len(self.channels)
        if self.size % downsampling or self.size < downsampling:
            raise ValueError(f"image size {self.size} must be a positive multiple of {downsampling} "
                             f"({len(self.channels)} stride-2 convolutions)")


class FeatureNet(nnx.Module):
    """Stride-2 3x3 convolutions, a dense feature layer and a multi-label head over LABELS.

    Images in, [B, size, size, 3] in [0, 1]: `features` gives [B, F], `__call__` the [B, len(LABELS)] logits.
    """

    def __init__(self, config: FeatureNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = (3,) + config.channels
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths, widths[1:])])
        # Flattened, not pooled: where an object is matters as much as what it is.
        spatial = config.size // 2 ** len(config.channels)
        self.hidden = nnx.Linear(spatial * spatial * config.channels[-1], config.features, rngs=rngs)
        self.head = nnx.Linear(config.features, len(LABELS), rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        x = 2 * images - 1
        for conv in self.convs:
            x = nnx.gelu(conv(x))
        return nnx.gelu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


def scene_labels(scene_list: Sequence[Scene]) -> np.ndarray:
    """Multi-hot targets [N, len(LABELS)] float32: for each object, its colour with its shape, size and position."""
    labels = np.zeros((len(scene_list), len(LABELS)), np.float32)
    for i, scene in enumerate(scene_list):
        for o in scene.objects:
            for attribute in (o.shape, o.size, o.position):
                labels[i, _LABEL_INDEX[f"{o.colour} {attribute}"]] = 1.0
    return labels


def train_feature_net(seed: int = 0, steps: int = 1500, batch_size: int = 32, size: int = 32,
                      log: Callable[[str], None] | None = None, learning_rate: float = 1e-2) -> FeatureNet:
    """A FeatureNet trained with Adam on fresh jittered renders of scenes(seed, ...) (sigmoid
    cross-entropy on scene_labels). `log`, if given, hears the loss now and then and, at the end,
    the time taken and the held-out accuracy (feature_net_accuracy on heldout_scenes).

    Reading shapes is what the net learns last: at the defaults it reads over 80% of the held-out
    images entirely right (in about 30 s on 2 CPU cores); at 400 steps most images still have a shape wrong.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    started = time.perf_counter()
    net = FeatureNet(FeatureNetConfig(size=size), rngs=nnx.Rngs(seed))
    graph, params = nnx.split(net)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(params):
            logits = nnx.merge(graph, params)(images)
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
        scene_list = scenes(seed, i * batch_size, batch_size)
        return render_batch(scene_list, size, seed=seed * steps + i), scene_labels(scene_list)

    # Rendering is numpy and the step is XLA: preparing the next batch in a thread overlaps the two.
    with ThreadPoolExecutor(max_workers=1) as renderer:
        upcoming = renderer.submit(batch, 0)
        for i in range(steps):
            images, labels = upcoming.result()
            if i + 1 < steps:
                upcoming = renderer.submit(batch, i + 1)
            params, opt_state, loss = step(params, opt_state, images, labels)
            if log is not None and (i + 1) % max(1, steps // 4) == 0:
                log(f"feature net step {i + 1}/{steps}: loss {float(loss):.4f}")
    net = nnx.merge(graph, params)
    if log is not None:
        accuracy = feature_net_accuracy(net, heldout_scenes(), jitter_seed=seed)
        log(f"feature net trained in {time.perf_counter() - started:.1f}s; held out: attribute accuracy "
            f"{accuracy['attribute_accuracy']:.3f}, label accuracy {accuracy['label_accuracy']:.4f}, "
            f"exact match {accuracy['exact_match']:.3f}")
    return net


def feature_net_accuracy(net: FeatureNet, scene_list: Sequence[Scene], jitter_seed: int | None = 0) -> dict[str, float]:
    """How well the net reads renders of `scene_list`:

    - "attribute_accuracy": over every object's shape, size and position, how often the net's
      highest logit among that colour's choices (3 shapes, 2 sizes, 9 positions) is the right one
      (chance: about 0.31);
    - "label_accuracy": the fraction of all len(LABELS) labels right (logit > 0 <=> present), averaged;
    - "exact_match": the fraction of images with every label right.
    """
    images = render_batch(scene_list, net.config.size, seed=jitter_seed)
    graph, state = nnx.split(net)
    logits = _batched(lambda x: _logits(graph, state, x), images, 256)
    right = (logits > 0) == (scene_labels(scene_list) > 0.5)
    attributes_right = [
        choices[int(np.argmax(logits[i, [_LABEL_INDEX[f"{o.colour} {choice}"] for choice in choices]]))] == value
        for i, scene in enumerate(scene_list) for o in scene.objects
        for choices, value in ((SHAPES, o.shape), (SIZES, o.size), (POSITIONS, o.position))]
    return {"attribute_accuracy": float(np.mean(attributes_right)), "label_accuracy": float(right.mean()),
            "exact_match": float(right.all(axis=1).mean())}


def image_features(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The net's features of images [N, size, size, 3] in [0, 1]: [N, F] float64."""
    images = np.asarray(images)
    expected = (net.config.size, net.config.size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images have shape {images.shape}; this feature net expects [N, {', '.join(map(str, expected))}]")
    graph, state = nnx.split(net)
    return np.asarray(_batched(lambda x: _features(graph, state, x), images, batch_size), np.float64)


def patch_crops(images: np.ndarray, crop: int = 16, stride: int = 8) -> np.ndarray:
    """Every crop x crop window of images [N, S, S, C] on a `stride` grid, magnified by pixel repetition
    back to S x S: [N·K², S, S, C] with K = (S − crop) / stride + 1 (image-major).

    The crops of a patch-level Fréchet distance (S2-Flash reports one beside whole-image FID, after
    high-resolution FID practice: Inception-sized crops of the full image). The shapes images are
    already the feature net's size, so each crop is magnified instead: by repetition, not
    interpolation, so that pixel-level grain and edge quality reach the features unsmoothed.
    """
    images = np.asarray(images)
    size = images.shape[1]
    if images.ndim != 4 or images.shape[2] != size or size % crop or crop > size or (size - crop) % stride:
        raise ValueError(f"images {images.shape}: expected [N, S, S, C] with S a multiple of crop={crop} and "
                         f"S - crop a multiple of stride={stride}")
    starts = range(0, size - crop + 1, stride)
    windows = crop_patches(images, [(y, x) for y in starts for x in starts], patch=crop)
    magnify = size // crop
    return einops.repeat(windows, "n h w c -> n (h a) (w b) c", a=magnify, b=magnify)


@functools.partial(jax.jit, static_argnums=0)
def _features(graph: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graph, state).features(images)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graph: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graph, state)(images)


def _batched(function: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int) -> np.ndarray:
    """function applied to images in batches; the last batch is padded so only one shape compiles."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], np.float32)])
        outputs.append(np.asarray(function(jnp.asarray(padded)))[:len(batch)])
    return np.concatenate(outputs)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to [N, F] feature sets."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets have shapes {a.shape} and {b.shape}; expected [N, F] and [M, F] with N, M >= 2")
    return frechet_distance_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_statistics(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray,
                                     cov_b: np.ndarray) -> float:
    """The Fréchet distance between N(mean_a [F], cov_a [F, F]) and N(mean_b, cov_b), in float64."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    dim = len(mean_a)
    if mean_a.shape != (dim,) or mean_b.shape != (dim,) or cov_a.shape != (dim, dim) or cov_b.shape != (dim, dim):
        raise ValueError(f"statistics have shapes {mean_a.shape}, {cov_a.shape} and {mean_b.shape}, {cov_b.shape}; "
                         "expected [F], [F, F] for both")
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product(cov_a, cov_b)
    return float(max(distance, 0.0))


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr (cov_a cov_b)^(1/2) for symmetric positive semi-definite [F, F] matrices, in float64.

    cov_a cov_b is similar to R cov_b R with R = cov_a^(1/2) (R⁻¹ (R² cov_b) R), a symmetric PSD
    matrix, so its root's trace is the sum of the roots of that matrix's eigenvalues: two symmetric
    eigendecompositions instead of pytorch-fid's scipy.linalg.sqrtm of the non-symmetric product
    (about 4x faster at F = 2048, benchmarks/frechet.py, and exact for singular covariances, which sqrtm needs a ridge
    for). Rounding can leave eigenvalues of order −1e-12 where the exact ones are 0; they count as 0.
    """
    def check_psd(values, name):
        if values[0] < -1e-6 * max(values[-1], 1e-300):
            raise ValueError(f"{name} is not positive semi-definite (eigenvalue {values[0]:.3g}, largest "
                             f"{values[-1]:.3g}); expected a covariance")

    values, vectors = np.linalg.eigh((cov_a + cov_a.T) / 2)
    check_psd(values, "the first covariance")
    values = np.clip(values, 0.0, None)
    # Only checked, so eigenvalues alone: several times cheaper than eigh's vectors at F = 2048.
    check_psd(np.linalg.eigvalsh((cov_b + cov_b.T) / 2), "the second covariance")
    root_a = (vectors * np.sqrt(values)) @ vectors.T
    product = root_a @ cov_b @ root_a
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None))))


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """Writes the net (config and weights) to one file, atomically: a reader sees the old file or the new one."""
    path = Path(path)
    payload = {"format": FILE_FORMAT, "config": {**dataclasses.asdict(net.config), "channels": list(net.config.channels)},
               "params": serialization.to_state_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(net))))}
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(serialization.msgpack_serialize(payload))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def load_feature_net(path: str | Path) -> FeatureNet:
    """The net written by save_feature_net at `path`."""
    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a feature net from {str(path)!r} ({e}); expected a file written by "
                         "save_feature_net") from None
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a feature net file; expected one written by save_feature_net")
    try:
        config = FeatureNetConfig(**payload["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} holds a feature-net config this version cannot read ({e})") from None
    graph, state = nnx.split(FeatureNet(config, rngs=nnx.Rngs(0)))
    expected = nnx.to_pure_dict(state)
    try:
        weights = serialization.from_state_dict(expected, payload["params"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{str(path)!r} does not hold the weights of its config's net ({e})") from None
    if jax.tree.map(np.shape, weights) != jax.tree.map(np.shape, expected):
        raise ValueError(f"{str(path)!r} holds weights of the wrong shapes for its config's net")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights))
    return nnx.merge(graph, state)
