"""CAME against the came-pytorch reference, step for step, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2flash_jax.train.came import came

torch = pytest.importorskip("torch")
came_pytorch = pytest.importorskip("came_pytorch")

# Unfactored (0-D, 1-element, 1-D) and factored (2-D, 3-D) leaves; the same
# array layout on both sides, so the factored dims agree.
SHAPES = {"scalar": (), "one": (1,), "vec": (7,), "mat": (5, 3), "ten": (2, 4, 6)}
STEPS = 10

# float64 on both sides leaves only rounding (summation order, rsqrt, fused
# multiply-adds) between them: measured at most 1.5e-15 absolute and 4e-14
# relative over 10 steps, so this keeps ~10x margin; a misplaced eps, beta,
# clip, decay or row/column mean moves the params by orders of magnitude more.
RTOL, ATOL = 1e-12, 1e-14


def _random_problem(seed: int):
    """Initial params and STEPS gradients, float64, keyed like SHAPES."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}

    # Per-entry scales that persist across steps make the row and column
    # statistics differ, so a factoring mistake cannot cancel out.
    scales = {k: np.exp(rng.normal(size=s)) for k, s in SHAPES.items()}
    grads = [{k: scales[k] * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def _run_reference(params, grads, lrs, **kwargs):
    """came-pytorch's params after each step; lrs[i] is the learning rate of step i."""
    torch_params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    opt = came_pytorch.CAME(list(torch_params.values()), lr=lrs[0], **kwargs)
    history = []
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        history.append({k: p.detach().numpy().copy() for k, p in torch_params.items()})
    return history


def _run_ours(params, grads, opt):
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for g in grads:
        params, state = step(params, state, g)
        history.append(params)
    return history


LINEAR_WARMUP = optax.linear_schedule(1e-3, 1e-2, transition_steps=STEPS // 2)


@pytest.mark.parametrize(
    "learning_rate, kwargs",
    [
        (1e-2, dict(weight_decay=0.1)),
        (LINEAR_WARMUP, dict(weight_decay=0.0)),
        # Non-default values make every hyperparameter visible at float64 (the default
        # eps vanish next to O(1) squares); beta2 = 0.5 with clip_threshold = 2 mostly keeps
        # the update RMS under the threshold, the defaults always clip in 10 steps.
        (1e-2, dict(betas=(0.8, 0.5, 0.7), eps=(1e-3, 1e-2), clip_threshold=2.0, weight_decay=0.05)),
    ],
    ids=["constant-lr-decay", "schedule-no-decay", "custom-hyperparameters"],
)
def test_matches_came_pytorch_every_step(learning_rate, kwargs):
    params, grads = _random_problem(seed=0)
    lrs = [float(learning_rate(i)) if callable(learning_rate) else learning_rate for i in range(STEPS)]
    expected = _run_reference(params, grads, lrs, **kwargs)
    with jax.enable_x64(True):
        got = _run_ours(params, grads, came(learning_rate, **kwargs))
        for step, (want, have) in enumerate(zip(expected, got)):
            for k in SHAPES:
                np.testing.assert_allclose(have[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{k} at step {step}")


def test_zero_gradient_leaves_only_decay():
    """A never-touched leaf has statistics built from eps alone; it must stay finite and move by weight decay alone."""
    lr, wd = 1e-2, 0.1
    params, grads = _random_problem(seed=1)
    zero = ("scalar", "vec", "mat")
    grads = [{k: np.zeros_like(v) if k in zero else v for k, v in g.items()} for g in grads]
    params32, grads32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (params, grads))

    got = _run_ours(params32, grads32, came(lr, weight_decay=wd))[-1]
    for k in SHAPES:
        assert np.isfinite(got[k]).all(), k
    for k in zero:
        np.testing.assert_allclose(got[k], params[k] * (1 - lr * wd) ** STEPS, rtol=1e-6)


def test_state_is_float32_for_half_precision_params():
    params = {"mat": jnp.zeros((5, 3), jnp.bfloat16), "vec": jnp.zeros(7, jnp.float16)}
    state = came(1e-2).init(params)[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[1:]))


def test_state_can_be_donated_to_a_jitted_update():
    """Every state field owns its buffer: XLA refuses to donate one buffer twice."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    optimizer = came(1e-3)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, state):
        return optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)

    updates, _ = step(params, optimizer.init(params))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
