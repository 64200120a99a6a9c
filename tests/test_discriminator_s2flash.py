"""The S2-Flash / DMD2 conv discriminator heads, against a torch transcription of DMD2's
`cls_pred_branch` (tianweiy/DMD2 main/sd_guidance.py) holding the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.models.discriminator import (
    ConvDiscriminatorHeads, ConvHead, downsample_count, group_count)
from s2flash_jax.models.params import param_paths
from s2flash_jax.parallel.axes import logical_to_mesh_axes

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

# 128 channels: GroupNorm's 16 groups of 8 (group_count), each group's statistics at the 1x1 stage
# from its 8 channels alone; DMD2's 1280 have 32 groups of 40.
WIDTH, BATCH = 128, 3

# float32 on both sides, differing in summation order (oneDNN vs XLA convs over 16·128 = 2048 terms,
# up to five convs and four group norms deep). Measured |Δ| ≤ 1e-6 at logits of magnitude ~0.3;
# a wrong layout, padding, stride or grouping moves them by 1e-2 or more.
ATOL = RTOL = 1e-5


def features(seed, grid, batch=BATCH, width=WIDTH):
    rng = np.random.default_rng(seed)
    return jnp.asarray(1.5 * rng.standard_normal((batch, grid[0] * grid[1], width)) + 0.3, jnp.float32)


def random_norms(head: ConvHead, seed=0):
    """Non-trivial GroupNorm weights and biases (init is 1 and 0), so their mapping is exercised."""
    rng = np.random.default_rng(seed)
    for stage in [*head.downsample, head.reduce]:
        stage.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, WIDTH), jnp.float32)
        stage.norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.2, WIDTH), jnp.float32)


# ---- torch reference ----

def dmd2_branch(width: int, downsamples: int, pooled: bool, groups: int = 16) -> nn.Sequential:
    """DMD2's cls_pred_branch for `downsamples` stride-2 blocks, GroupNorm(groups) (DMD2: 32); with
    `pooled`, a 1x1 conv in place of the 4x4 stride-4 one (applied after a global mean, see torch_logits)."""
    layers = []
    for _ in range(downsamples):
        layers += [nn.Conv2d(width, width, kernel_size=4, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
    k = 1 if pooled else 4
    layers += [nn.Conv2d(width, width, kernel_size=k, stride=k, padding=0), nn.GroupNorm(groups, width), nn.SiLU(),
               nn.Conv2d(width, 1, kernel_size=1, stride=1, padding=0)]
    return nn.Sequential(*layers)


def load_from_jax(branch: nn.Sequential, head: ConvHead):
    """Copy the head's weights into the branch: HWIO kernels -> OIHW, GroupNorm weight/bias as is."""
    convs = [m for m in branch if isinstance(m, nn.Conv2d)]
    norms = [m for m in branch if isinstance(m, nn.GroupNorm)]
    stages = [*head.downsample, head.reduce]
    assert len(convs) == len(stages) + 1 and len(norms) == len(stages)
    with torch.no_grad():
        for conv, jax_conv in zip(convs, [s.conv for s in stages] + [head.cls]):
            conv.weight.copy_(torch.from_numpy(np.asarray(jax_conv.kernel[...]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(jax_conv.bias[...])))
        for norm, stage in zip(norms, stages):
            norm.weight.copy_(torch.from_numpy(np.array(stage.norm.weight[...])))
            norm.bias.copy_(torch.from_numpy(np.array(stage.norm.bias[...])))


def torch_logits(branch: nn.Sequential, tokens: np.ndarray, grid, pooled: bool) -> np.ndarray:
    """tokens [B, N, D] -> NCHW [B, D, H, W] -> branch -> logits averaged over what is left of the grid."""
    x = torch.from_numpy(np.array(tokens)).reshape(tokens.shape[0], *grid, WIDTH).permute(0, 3, 1, 2)
    with torch.no_grad():
        stages = list(branch)
        downsample, rest = stages[:-4], stages[-4:]
        h = nn.Sequential(*downsample)(x) if downsample else x
        if pooled:
            h = h.mean(dim=(2, 3), keepdim=True)
        return nn.Sequential(*rest)(h).mean(dim=(1, 2, 3)).numpy()


# ---- tests ----

def test_layout_follows_the_grid_and_width():
    assert [downsample_count(s, s) for s in (32, 16, 8, 4, 2)] == [3, 2, 1, 0, 0]
    assert downsample_count(64, 32) == 3 and downsample_count(6, 6) == 1
    assert [group_count(c) for c in (1152, 2240, 256, 128, 64, 48, 16, 12, 7)] == [32, 32, 32, 16, 8, 6, 2, 1, 1]
    assert group_count(1152, max_groups=16) == 16

    head = ConvHead(WIDTH, (32, 32), rngs=nnx.Rngs(0))  # DMD2's SDXL head: three stride-2 blocks
    assert len(head.downsample) == 3 and not head.global_pool
    assert head.downsample[0].conv.kernel[...].shape == (4, 4, WIDTH, WIDTH)
    assert head.reduce.conv.kernel[...].shape == (4, 4, WIDTH, WIDTH)
    assert head.cls.kernel[...].shape == (1, 1, WIDTH, 1)
    assert len(ConvHead(WIDTH, (16, 16), rngs=nnx.Rngs(0)).downsample) == 2
    small = ConvHead(WIDTH, (2, 2), rngs=nnx.Rngs(0))
    assert len(small.downsample) == 0 and small.global_pool
    assert small.reduce.conv.kernel[...].shape == (1, 1, WIDTH, WIDTH)


@pytest.mark.parametrize("grid", [(16, 16), (32, 32)])
def test_output_shapes(grid):
    heads = ConvDiscriminatorHeads(WIDTH, 2, grid, rngs=nnx.Rngs(0))
    logits = heads([features(0, grid), features(1, grid)])
    assert logits.shape == (BATCH,) and logits.dtype == jnp.float32
    assert ConvHead(WIDTH, grid, rngs=nnx.Rngs(1))(features(0, grid)).shape == (BATCH,)


@pytest.mark.parametrize("width", [WIDTH, 16])
def test_logits_depend_on_each_examples_own_input(width):
    """Different inputs give different logits, and one example's input moves only its own logit
    (GroupNorm is per example, so R1 through this head is per example). 16 channels: a narrow head
    whose 1x1 GroupNorm would output a constant with one channel per group."""
    grid = (16, 16)
    head = ConvHead(width, grid, rngs=nnx.Rngs(0))
    x = features(0, grid, width=width)
    logits = head(x)
    assert np.ptp(np.asarray(logits)) > 1e-3
    moved = head(x.at[0].set(features(5, grid, width=width)[0]))
    assert abs(float(moved[0] - logits[0])) > 1e-4
    np.testing.assert_array_equal(moved[1:], logits[1:])


def test_jit_and_grad():
    grid = (16, 16)
    heads = ConvDiscriminatorHeads(WIDTH, 2, grid, rngs=nnx.Rngs(0))
    fs = [features(0, grid), features(1, grid)]
    np.testing.assert_allclose(nnx.jit(lambda m, f: m(f))(heads, fs), heads(fs), atol=1e-6, rtol=1e-6)

    @nnx.jit
    def grads(model, feature_maps):
        return nnx.grad(lambda m, f: jnp.sum(jax.nn.softplus(-m(f))), argnums=(0, 1))(model, feature_maps)

    param_grads, feature_grads = grads(heads, fs)
    for path, g in nnx.to_flat_state(param_grads):
        assert np.all(np.isfinite(g[...])) and np.any(g[...] != 0), path
    assert all(np.any(np.asarray(g) != 0) for g in feature_grads)


@pytest.mark.parametrize("grid", [(32, 32), (16, 16), (12, 4), (3, 3)])
def test_head_equals_torch(grid):
    """32x32 and 16x16: DMD2's stack; 12x4: three 4x4 windows averaged; 3x3: the global-mean path."""
    head = ConvHead(WIDTH, grid, rngs=nnx.Rngs(0))
    random_norms(head)
    branch = dmd2_branch(WIDTH, len(head.downsample), head.global_pool)
    load_from_jax(branch, head)
    x = features(1, grid)
    np.testing.assert_allclose(head(x), torch_logits(branch, np.asarray(x), grid, head.global_pool),
                               atol=ATOL, rtol=RTOL)


def test_heads_average_their_logits_as_torch():
    grid = (16, 16)
    heads = ConvDiscriminatorHeads(WIDTH, 3, grid, rngs=nnx.Rngs(2))
    fs = [features(i, grid) for i in range(3)]
    expected = []
    for i, head in enumerate(heads.heads):
        random_norms(head, seed=i)
        branch = dmd2_branch(WIDTH, len(head.downsample), False)
        load_from_jax(branch, head)
        expected.append(torch_logits(branch, np.asarray(fs[i]), grid, False))
    np.testing.assert_allclose(heads(fs), np.mean(expected, axis=0), atol=ATOL, rtol=RTOL)


def test_parameters_carry_logical_axes_with_rules():
    for path, (shape, names) in param_paths(ConvDiscriminatorHeads(WIDTH, 2, (8, 8), rngs=nnx.Rngs(0))).items():
        assert names is not None and len(names) == len(shape), path
        logical_to_mesh_axes(names)  # raises for a name the rules table lacks


def test_bad_input_is_named():
    head = ConvHead(WIDTH, (8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected \[B, 64, 128\] for a 8x8 grid"):
        head(features(0, (4, 4)))
    heads = ConvDiscriminatorHeads(WIDTH, 2, (8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="1 feature maps for 2 heads"):
        heads([features(0, (8, 8))])
    with pytest.raises(ValueError, match="positive sides"):
        ConvHead(WIDTH, (0, 8), rngs=nnx.Rngs(0))
