"""The LADD discriminator heads against a torch transcription of the diffusers SANA-Sprint port
(examples/research_projects/sana/train_sana_sprint_diffusers.py, itself StyleGAN-T's DiscHead)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2flash_jax.models.discriminator import BatchNormLocal, DiscriminatorHeads

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tests.sprint_reference import (  # noqa: E402
    CONVS, NORMS, TorchBatchNormLocal, TorchDiscHead, at_path, load_torch_head, torch_heads_forward, torch_v_to_jax)

# float32 on both sides (the JAX tests run without x64), differing only in summation order
# (oneDNN vs XLA convs over in·k = 216 terms, three convs and two group norms deep). Measured:
# outputs |Δ| ≤ 1e-6 at magnitude ~3, u and v ≤ 1.2e-7 (unit vectors), feature gradients ≤ 1e-7
# at ~0.1, parameter gradients ~1e-7 relative (they reach ~400: the loss sums 384 logits). 1e-5
# leaves ≥ 10x headroom and still catches real mismatches (a wrong σ, padding, grouping or
# layout moves results by 1e-2 or more).
ATOL = RTOL = 1e-5

WIDTH, HEADS, BATCH, TOKENS = 24, 2, 16, 12  # BATCH = two virtual batches of 8


# ---- helpers ----

def make_pair(seed=0):
    """A torch ModuleList of heads and a DiscriminatorHeads holding the same weights and u, v."""
    torch.manual_seed(seed)
    reference = nn.ModuleList([TorchDiscHead(WIDTH) for _ in range(HEADS)])
    with torch.no_grad():  # non-trivial affine so the BN weight/bias mapping is exercised
        for module in reference.modules():
            if isinstance(module, TorchBatchNormLocal):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    model = DiscriminatorHeads(WIDTH, HEADS, rngs=nnx.Rngs(seed))
    for head, torch_head in zip(model.heads, reference):
        load_torch_head(head, torch_head.state_dict())
    return reference, model


def random_features(seed=0):
    rng = np.random.default_rng(seed)
    return [(2.0 * rng.standard_normal((BATCH, TOKENS, WIDTH)) + 0.5).astype(np.float32) for _ in range(HEADS)]


@nnx.jit(static_argnames="update_stats")
def run(model, features, update_stats):
    return model(features, update_stats=update_stats)


@nnx.jit
def logit_sum_grads(model, features):
    """(parameter gradients, feature gradients) of the train-mode logit sum."""
    return nnx.grad(lambda m, fs: m(fs, update_stats=True).sum(), argnums=(0, 1))(model, features)


def assert_same_uv(reference, model):
    for head, torch_head in zip(model.heads, reference):
        for prefix, path in CONVS.items():
            torch_conv, conv = torch_head.get_submodule(prefix), at_path(head, path)
            np.testing.assert_allclose(np.asarray(conv.u[...]), torch_conv.weight_u.numpy(), rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(
                np.asarray(conv.v[...]), torch_v_to_jax(torch_conv.weight_v.numpy(), conv.kernel.shape[0]),
                rtol=RTOL, atol=ATOL)


def uv_snapshot(model):
    """state path -> value of every u and v."""
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


# ---- tests ----

def test_train_mode_matches_torch_over_two_power_iterations():
    reference, model = make_pair()
    features = random_features()
    reference.train()
    before = uv_snapshot(model)
    for step in range(2):
        expected = torch_heads_forward(reference, [torch.from_numpy(f) for f in features]).detach().numpy()
        got = np.asarray(run(model, [jnp.asarray(f) for f in features], update_stats=True))
        assert got.shape == (BATCH, HEADS * TOKENS) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"forward {step}")
        assert_same_uv(reference, model)
    after = uv_snapshot(model)
    moved = {path for path in before if np.abs(after[path] - before[path]).max() > 1e-3}
    assert moved == {path for path in before if path[-2:] != ("cls", "u")}  # cls's u is [1] = ±1


def test_eval_mode_keeps_u_v_and_matches_torch():
    reference, model = make_pair()
    features = random_features()
    reference.train()
    torch_heads_forward(reference, [torch.from_numpy(f) for f in features])  # move u, v off their init
    run(model, [jnp.asarray(f) for f in features], update_stats=True)
    reference.eval()
    before = uv_snapshot(model)
    other = random_features(1)
    with torch.no_grad():
        expected = torch_heads_forward(reference, [torch.from_numpy(f) for f in other]).numpy()
    got = np.asarray(run(model, [jnp.asarray(f) for f in other], update_stats=False))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    after = uv_snapshot(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    assert_same_uv(reference, model)


def test_gradients_match_torch_autograd():
    """Torch's train-mode spectral norm backprops through σ = u·W v (W = weight_orig) with the
    freshly updated u, v treated as constants; the JAX head must give the same gradients for the
    features and for every parameter."""
    reference, model = make_pair()
    features = random_features()
    reference.train()
    torch_features = [torch.from_numpy(f).requires_grad_(True) for f in features]
    torch_heads_forward(reference, torch_features).sum().backward()

    param_grads, feature_grads = logit_sum_grads(model, [jnp.asarray(f) for f in features])

    for got, tf in zip(feature_grads, torch_features):
        np.testing.assert_allclose(np.asarray(got), tf.grad.numpy(), rtol=RTOL, atol=ATOL)
    for i, torch_head in enumerate(reference):
        head_grads = param_grads.heads[i]
        for prefix, path in CONVS.items():
            torch_conv, conv_grads = torch_head.get_submodule(prefix), at_path(head_grads, path)
            np.testing.assert_allclose(np.asarray(conv_grads.kernel[...]),
                                       torch_conv.weight_orig.grad.numpy().transpose(2, 1, 0),
                                       rtol=RTOL, atol=ATOL, err_msg=prefix)
            np.testing.assert_allclose(np.asarray(conv_grads.bias[...]), torch_conv.bias.grad.numpy(),
                                       rtol=RTOL, atol=ATOL, err_msg=prefix)
        for prefix, path in NORMS.items():
            torch_norm, norm_grads = torch_head.get_submodule(prefix), at_path(head_grads, path)
            np.testing.assert_allclose(np.asarray(norm_grads.weight[...]), torch_norm.weight.grad.numpy(),
                                       rtol=RTOL, atol=ATOL, err_msg=prefix)
            np.testing.assert_allclose(np.asarray(norm_grads.bias[...]), torch_norm.bias.grad.numpy(),
                                       rtol=RTOL, atol=ATOL, err_msg=prefix)
    assert_same_uv(reference, model)  # the differentiated forward also stored its power iteration


def _norm_with_random_affine(virtual_batch):
    with nnx.use_eager_sharding(False):
        norm = BatchNormLocal(WIDTH, virtual_batch=virtual_batch)
    rng = np.random.default_rng(1)
    norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, WIDTH).astype(np.float32))
    norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.2, WIDTH).astype(np.float32))
    return norm


def test_batch_norm_local_groups_are_independent():
    norm = _norm_with_random_affine(virtual_batch=8)
    x = jnp.asarray(random_features()[0])
    halves = jnp.concatenate([norm(x[:8]), norm(x[8:])])
    np.testing.assert_allclose(np.asarray(norm(x)), np.asarray(halves), rtol=1e-6, atol=1e-6)
    whole_batch = _norm_with_random_affine(virtual_batch=BATCH)(x)
    assert np.abs(np.asarray(whole_batch - halves)).max() > 1e-2  # the grouping changes the result


@pytest.mark.parametrize("batch", [4, 12, 16])
def test_batch_norm_local_group_sizes_match_torch(batch):
    """ceil(B / 8) equal groups: B=4 is one group of 4, B=12 two groups of 6, B=16 two of 8."""
    norm = _norm_with_random_affine(virtual_batch=8)
    reference = TorchBatchNormLocal(WIDTH)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(np.asarray(norm.weight[...])))
        reference.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    x = random_features()[0][:batch]
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=RTOL, atol=ATOL)


def test_batch_norm_local_rejects_batches_torch_cannot_view():
    x = random_features()[0][:9]  # ceil(9 / 8) = 2 groups do not divide 9
    with pytest.raises(RuntimeError):
        TorchBatchNormLocal(WIDTH)(torch.from_numpy(x).transpose(1, 2))
    with pytest.raises(ValueError, match="equal groups"):
        _norm_with_random_affine(virtual_batch=8)(jnp.asarray(x))


def test_bf16_features_are_computed_in_float32():
    _, model = make_pair()
    features = [jnp.asarray(f, jnp.bfloat16) for f in random_features()]
    got = run(model, features, update_stats=False)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(run(model, [f.astype(jnp.float32) for f in features], update_stats=False)))


def test_power_iteration_state_splits_from_parameters():
    _, model = make_pair()
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # per head: 3 convs x (kernel, bias) + 2 norms x (weight, bias) params; 3 convs x (u, v) stats
    assert len(jax.tree.leaves(params)) == HEADS * 10
    assert len(jax.tree.leaves(stats)) == HEADS * 6
    with pytest.raises(ValueError, match="feature maps"):
        model(random_features()[:1], update_stats=False)
