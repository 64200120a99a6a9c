"""InceptionV3 as FID uses it, in Flax NNX (NHWC), with the input conventions of pytorch-fid and clean-fid.

The network is pytorch-fid's `InceptionV3` with `use_fid_inception=True` (the graph of TensorFlow's
2015-12-05 Inception that the original FID code ran), up to the 2048-d pool3 features:
torchvision's Inception3 stem and Mixed_5b..Mixed_7c, with the FID variant's blocks where they
differ from torchvision's: the pooling branch of every InceptionA / InceptionC and of the first
InceptionE averages without counting the zero padding (TensorFlow's `count_include_pad=False`), and
the last InceptionE max-pools instead. Module and parameter names follow the torch state dict
(`Mixed_6b.branch7x7_2.conv.weight` -> `Mixed_6b/branch7x7_2/conv/kernel`), so the importer in
`conversion/inception.py` is a rename plus the OIHW -> HWIO transpose. Batch norms are frozen
(running statistics, eps 1e-3, as torchvision's BasicConv2d).

How images reach the network is where FID implementations differ, so it is a choice here
(`RESIZE_MODES`), and both modes first quantise to uint8, as saving a PNG and reading it back does:

- "clean" (clean-fid's default "clean" mode): each channel resized to 299x299 by PIL's bicubic
  filter in float32 ("F" mode: no second rounding after the resize), clipped to [0, 255]. PIL
  widens the filter when it shrinks an image, so downsampling is anti-aliased. Runs on the host.
- "pytorch-fid" (pytorch-fid, and clean-fid's "legacy_pytorch"): `F.interpolate(bilinear,
  align_corners=False)` to 299x299, no anti-aliasing: downsampling a 1024 px image this way skips
  pixels (aliases). Runs on the device (`jax.image.scale_and_translate`, linear, antialias=False).

Either way the network sees values 2·(u / 255) − 1 for the uint8 value u (pytorch-fid's
`normalize_input`); clean-fid's own TorchScript Inception normalises with (u − 128) / 128 instead,
a 0.4% difference of scale that moves FID by well under its sampling noise. Images of exactly
299x299 (patches) are not resized in either mode.

`InceptionFeatures` runs the jitted network on every local device (the batch split over the
mesh's data axes, weights replicated) and returns features still on the devices, ready for
`eval.fid.FeatureStatistics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from s2flash_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, padded_batches
from s2flash_jax.outputs import to_uint8

INPUT_SIZE = 299  # the resolution the FID Inception was trained at, and every FID resizes to
MIN_SIZE = 75  # smaller inputs run out of pixels before pool3
FEATURES = 2048  # pool3
CLEAN, PYTORCH_FID = "clean", "pytorch-fid"
RESIZE_MODES = (CLEAN, PYTORCH_FID)
BN_EPS = 1e-3  # torchvision's BasicConv2d


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class FrozenBatchNorm(nnx.Module):
    """Inference batch norm from stored statistics: (x − running_mean)·weight/√(running_var + eps) + bias.

    x: [..., C] -> [..., C]. The four vectors are nnx.Params only so that they travel (and are
    imported) with the weights; nothing trains them.
    """

    def __init__(self, channels: int):
        self.weight = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.running_mean = nnx.Param(jnp.zeros((channels,)))
        self.running_var = nnx.Param(jnp.ones((channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
        return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv2d(nnx.Module):
    """Conv (no bias) + frozen batch norm + ReLU, torchvision's BasicConv2d. [B, H, W, C_in] -> [B, H', W', C_out].

    Convolutions run at `precision` (HIGHEST by default: on GPUs the default would be TF32, whose
    10-bit mantissa moves pool3 features by ~1e-3 relative).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs,
                 precision: jax.lax.Precision = jax.lax.Precision.HIGHEST):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=precision, rngs=rngs)
        self.bn = FrozenBatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool over [B, H, W, C]; padding counts as −inf, as torch's."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_without_padding(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average pool over [B, H, W, C] that divides by the number of real
    pixels under the window (torch's count_include_pad=False, TensorFlow's only mode): border outputs
    are not pulled towards zero."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    counts = jax.lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add,
                                   (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return sums / counts


class InceptionA(nnx.Module):
    """FIDInceptionA: [B, H, W, C] -> [B, H, W, 224 + pool_features]."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_without_padding(x))
        return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
    """torchvision's InceptionB (grid reduction): [B, H, W, C] -> [B, (H − 3)/2 + 1, ·, 480 + C]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (factorised 7x7): [B, H, W, C] -> [B, H, W, 768]."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_without_padding(x))
        return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
    """torchvision's InceptionD (grid reduction): [B, H, W, C] -> [B, (H − 3)/2 + 1, ·, 512 + C]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (average pool without padding) or, with max_pool=True, FIDInceptionE_2: the
    TensorFlow graph max-pools in its last block (likely a slip there, kept because the FID
    features are defined by it). [B, H, W, C] -> [B, H, W, 2048]."""

    def __init__(self, in_channels: int, *, max_pool: bool, rngs: nnx.Rngs):
        self.use_max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=-1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jnp.concatenate([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)],
                                       axis=-1)
        pooled = max_pool(x, stride=1, padding=1) if self.use_max_pool else avg_pool_without_padding(x)
        return jnp.concatenate([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 up to pool3.

    images [B, H, W, 3] in [0, 1] (H, W >= 75; 299 for comparable FIDs, see `preprocess`) ->
    features float32 [B, 2048]. Random weights here; real ones come from `conversion.inception`.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if min(images.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"InceptionV3 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {images.shape[1:3]}")
        x = 2.0 * images.astype(jnp.float32) - 1.0  # pytorch-fid's normalize_input: [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, stride=2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1)


def pil_bicubic_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's resize: uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255], each channel
    resized by PIL's bicubic filter in float ("F") mode, then clipped."""
    if image.shape[:2] == (size, size):
        return image.astype(np.float32)
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
        (size, size), resample=Image.Resampling.BICUBIC)) for c in range(image.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0)


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source taps along one axis (align_corners=False): for each output index the
    two input indices and the weight of the second. As torch's kernel: a float32 scale, the source
    position scale·(i + ½) − ½ as one fused multiply-add rounded once to float32 (exact in float64
    first; rounding the product separately moves 1024 -> 299 taps by up to 2e-5 of a pixel)."""
    scale = np.float64(np.float32(size_in / size_out))
    source = np.maximum(scale * (np.arange(size_out) + 0.5) - 0.5, 0.0).astype(np.float32)
    first = np.minimum(np.floor(source).astype(np.int32), size_in - 1)
    return first, np.minimum(first + 1, size_in - 1), (source - first).astype(np.float32)


def bilinear_resize(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """torch's F.interpolate(mode="bilinear", align_corners=False, antialias=False): [B, H, W, C] -> [B, size, size, C].

    Half-pixel centres, two taps per axis at any scale (no anti-aliasing: shrinking skips pixels),
    source positions clamped at the border; the taps are torch's own arithmetic (`_linear_taps`).
    """
    if images.shape[1:3] == (size, size):
        return images
    for axis in (1, 2):
        first, second, weight = _linear_taps(images.shape[axis], size)
        shape = [1, 1, 1, 1]
        shape[axis] = size
        weight = jnp.asarray(weight).reshape(shape)
        images = (1 - weight) * jnp.take(images, first, axis=axis) + weight * jnp.take(images, second, axis=axis)
    return images


@dataclasses.dataclass
class InceptionFeatures:
    """Batched, sharded pool3 features of images under one resize convention.

    model: the network (weights imported by `conversion.inception.load_inception`); resize: one of
    RESIZE_MODES; batch_size: images per compiled batch (rounded up to a multiple of the device
    count; the last batch is padded, see `padded_batches`, and the padding masked by the caller's count).
    """

    model: InceptionV3
    resize: str = CLEAN
    batch_size: int = 64
    size: int = INPUT_SIZE

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"FID resize mode {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        self._mesh = make_mesh(MeshConfig(data=-1))
        devices = self._mesh.size
        self.batch_size = -(-self.batch_size // devices) * devices
        self._sharded = batch_sharding(self._mesh)
        graphdef, state = nnx.split(self.model)
        self._state = jax.device_put(state, NamedSharding(self._mesh, PartitionSpec()))
        size = self.size

        def run(state, images):
            x = images.astype(jnp.float32) / 255.0  # uint8 values (PIL-resized floats in "clean" mode)
            if x.shape[1:3] != (size, size):
                x = bilinear_resize(x, size)
            return nnx.merge(graphdef, state)(x)

        self._run = jax.jit(run, in_shardings=(None, self._sharded), out_shardings=self._sharded)
        self._pool = ThreadPoolExecutor(max_workers=4) if self.resize == CLEAN else None

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """Host side: images [N, H, W, 3] in [0, 1] (float) or uint8 -> what `__call__` feeds the
        device: uint8 [N, H, W, 3] ("pytorch-fid": resized on the device), or float32 [N, size,
        size, 3] in [0, 255] ("clean": PIL on the host, one thread per image)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images have shape {images.shape}; expected [N, H, W, 3]")
        u8 = images if images.dtype == np.uint8 else to_uint8(images)
        if self.resize == PYTORCH_FID or u8.shape[1:3] == (self.size, self.size):
            return u8
        return np.stack(list(self._pool.map(lambda image: pil_bicubic_resize(image, self.size), u8)))

    def __call__(self, images: np.ndarray) -> list[tuple[jax.Array, int]]:
        """Features of images [N, H, W, 3] (see `prepare`): a list of (features [B, 2048] on the
        devices, number of real rows at the top) per batch."""
        return [(self._run(self._state, jax.device_put(padded, self._sharded)), count)
                for (padded,), count in padded_batches([self.prepare(images)], self.batch_size, self._mesh.size)]


PATCH_LAYOUTS = ("center", "five")


def patch_origins(height: int, width: int, layout: str, patch: int = INPUT_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the fixed patch x patch crops for patch FID, taken at full resolution (no resize).

    "center": the centre crop (SDXL-Lightning's and S2-Flash's FID-patch); "five": the four corners
    and the centre (torchvision's FiveCrop). ValueError for images smaller than a patch.
    """
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch layout {layout!r} is not one of {', '.join(PATCH_LAYOUTS)}")
    if height < patch or width < patch:
        raise ValueError(f"patch FID needs images of at least {patch}x{patch}; these are {height}x{width}")
    center = ((height - patch) // 2, (width - patch) // 2)
    if layout == "center":
        return [center]
    return [(0, 0), (0, width - patch), (height - patch, 0), (height - patch, width - patch), center]


def crop_patches(images: np.ndarray, origins: Sequence[tuple[int, int]], patch: int = INPUT_SIZE) -> np.ndarray:
    """images [N, H, W, C] -> [N · len(origins), patch, patch, C], image-major."""
    return np.stack([image[top:top + patch, left:left + patch] for image in images for top, left in origins])


def features_to_host(batches: list[tuple[jax.Array, int]]) -> np.ndarray:
    """The real rows of `InceptionFeatures` output, concatenated on the host: float32 [N, 2048]."""
    return np.concatenate([np.asarray(features)[:count] for features, count in batches])


def map_batches(function: Callable[[np.ndarray], object], images: np.ndarray, size: int):
    """function over consecutive slices of `size` images (the last one shorter)."""
    return [function(images[start:start + size]) for start in range(0, len(images), size)]
