"""Torch references for SANA-Sprint, transcribed from the diffusers port
(examples/research_projects/sana/train_sana_sprint_diffusers.py):

- the LADD discriminator heads (StyleGAN-T's DiscHead, unconditional path c_dim=0) and a loader
  that copies them, power-iteration vectors included, into the JAX `DiscHead`;
- the TrigFlow wrapper around diffusers' `SanaTransformer2DModel`, the hooked-teacher
  discriminator, and the generator (sCM + adversarial) and discriminator (hinge) losses;
- what a JAX-vs-torch comparison of the recipe needs: the same random networks in both frameworks
  (`build_networks`), a batch, and the random draws of a JAX phase loss as torch tensors.

The losses take their random draws as explicit tensors (`GeneratorDraws`, `DiscriminatorDraws`)
so a caller can feed the same numbers to the JAX recipe. Where the port and NVlabs/Sana differ,
this follows NVlabs as the JAX recipe does: logvar comes from the flow-time embedding (the port
embeds the TrigFlow time), the adversarial sample starts from `generator_times` (the port's
discriminator phase confuses the max time with its probability), and real and fake discriminator
times are independent. Tensors are NCHW; t is [B].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.spectral_norm import SpectralNorm

from conversion.sana_diffusers import sana_from_diffusers
from s2flash_jax.flows import trigflow as jax_trigflow
from s2flash_jax.losses import ladd as jax_ladd
from s2flash_jax.losses import scm as jax_scm
from s2flash_jax.precision import FP32
from s2flash_jax.recipes.sana_sprint import SanaSprintConfig, discriminator_for

# ---- discriminator heads, as the port writes them ----


class ResidualBlock(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / np.sqrt(2)


class SpectralConv1d(nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SpectralNorm.apply(self, name="weight", n_power_iterations=1, dim=0, eps=1e-12)


class TorchBatchNormLocal(nn.Module):
    def __init__(self, num_features, affine=True, virtual_bs=8, eps=1e-5):
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.affine = affine
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        shape = x.size()
        G = np.ceil(x.size(0) / self.virtual_bs).astype(int)
        x = x.view(G, -1, x.size(-2), x.size(-1))
        mean = x.mean([1, 3], keepdim=True)
        var = x.var([1, 3], keepdim=True, unbiased=False)
        x = (x - mean) / (torch.sqrt(var + self.eps))
        if self.affine:
            x = x * self.weight[None, :, None] + self.bias[None, :, None]
        return x.view(shape)


def make_block(channels, kernel_size):
    return nn.Sequential(
        SpectralConv1d(channels, channels, kernel_size=kernel_size, padding=kernel_size // 2,
                       padding_mode="circular"),
        TorchBatchNormLocal(channels),
        nn.LeakyReLU(0.2, True),
    )


class TorchDiscHead(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.main = nn.Sequential(make_block(channels, kernel_size=1),
                                  ResidualBlock(make_block(channels, kernel_size=9)))
        self.cls = SpectralConv1d(channels, 1, kernel_size=1, padding=0)

    def forward(self, x):
        return self.cls(self.main(x))


def torch_heads_forward(heads, features):
    """SanaMSCMDiscriminator.forward after the teacher: [B, N, D] -> [B, D, N] per head, concat."""
    return torch.cat([head(f.transpose(1, 2)).reshape(f.shape[0], -1) for head, f in zip(heads, features)], dim=1)


# ---- torch DiscHead state_dict -> JAX DiscHead ----

# torch module prefix -> attribute path in the JAX DiscHead
CONVS = {"main.0.0": ("entry", "conv"), "main.1.fn.0": ("residual", "conv"), "cls": ("cls",)}
NORMS = {"main.0.1": ("entry", "norm"), "main.1.fn.1": ("residual", "norm")}


def at_path(node, path):
    return functools.reduce(getattr, path, node)


def torch_v_to_jax(v, kernel_size):
    """torch's v indexes the flattened [in, k] of weight_orig [out, in, k]; ours is [k, in]."""
    return v.reshape(-1, kernel_size).T


def load_torch_head(head, state):
    """Copy a torch DiscHead state_dict (weights and power-iteration buffers) into a JAX DiscHead."""
    state = {k: v.detach().numpy() for k, v in state.items()}
    used = set()
    for prefix, path in CONVS.items():
        conv = at_path(head, path)
        weight = state[f"{prefix}.weight_orig"]  # [out, in, k]
        conv.kernel[...] = jnp.asarray(weight.transpose(2, 1, 0))
        conv.bias[...] = jnp.asarray(state[f"{prefix}.bias"])
        conv.u[...] = jnp.asarray(state[f"{prefix}.weight_u"])
        conv.v[...] = jnp.asarray(torch_v_to_jax(state[f"{prefix}.weight_v"], weight.shape[2]))
        used |= {f"{prefix}.{name}" for name in ("weight_orig", "bias", "weight_u", "weight_v")}
    for prefix, path in NORMS.items():
        norm = at_path(head, path)
        norm.weight[...] = jnp.asarray(state[f"{prefix}.weight"])
        norm.bias[...] = jnp.asarray(state[f"{prefix}.bias"])
        used |= {f"{prefix}.weight", f"{prefix}.bias"}
    assert used == set(state), sorted(set(state) ^ used)


def load_torch_heads(discriminator, torch_heads):
    """Copy torch DiscHeads, in order, into the heads of a JAX DiscriminatorHeads."""
    for head, torch_head in zip(discriminator.heads, torch_heads, strict=True):
        load_torch_head(head, torch_head.state_dict())


# ---- TrigFlow networks ----

def _per_example(values, like):
    return values.view(-1, *([1] * (like.ndim - 1)))


class TrigFlowSana(nn.Module):
    """The port's SanaTrigFlow: a flow-matching SanaTransformer2DModel called on TrigFlow (x_t/σ_d, t).

    The time embedder sees flow time s (a guidance-embedding student, SanaSprintPipeline) or
    1000·s·timestep_scale (a flow teacher, SanaPipeline). With logvar=True a Linear(D, 1) head on
    the flow-time embedding gives the sCM log-variance (diffusers' model has none of its own).
    """

    def __init__(self, model, logvar: bool = False):
        super().__init__()
        self.model = model
        width = model.config.num_attention_heads * model.config.attention_head_dim
        self.logvar_linear = nn.Linear(width, 1) if logvar else None

    def time_input(self, s):
        if self.model.config.guidance_embeds:
            return s
        return s * (1000.0 * self.model.config.timestep_scale)

    def forward(self, x_hat, t, caption, caption_mask, guidance=None, return_logvar=False):
        s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
        sb = _per_example(s, x_hat)
        norm = torch.sqrt(sb**2 + (1 - sb) ** 2)
        x_flow = x_hat * norm
        v = self.model(x_flow, caption, self.time_input(s), guidance=guidance, encoder_attention_mask=caption_mask,
                       return_dict=False)[0]
        f = ((1 - 2 * sb) * x_flow + (1 - 2 * sb + 2 * sb**2) * v) / norm
        if not return_logvar:
            return f
        # A second (tiny) time-embedding call, as the port does, instead of hooking the model's own.
        _, temb = self.model.time_embed(self.time_input(s), guidance=guidance, hidden_dtype=x_hat.dtype)
        return f, self.logvar_linear(temb)[:, 0]


class HookedDiscriminator(nn.Module):
    """SanaMSCMDiscriminator: one TorchDiscHead per teacher block in block_ids (ascending), fed the
    block outputs captured by forward hooks during a TrigFlow teacher call. Returns [B, K·N]."""

    def __init__(self, teacher: TrigFlowSana, block_ids, heads):
        super().__init__()
        self.teacher = teacher
        self.block_ids = sorted(block_ids)
        self.heads = nn.ModuleList(heads)

    def forward(self, x_hat, t, caption, caption_mask):
        features = []
        blocks = self.teacher.model.transformer_blocks
        hooks = [blocks[i].register_forward_hook(lambda module, args, out: features.append(out))
                 for i in self.block_ids]
        try:
            self.teacher(x_hat, t, caption, caption_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return torch_heads_forward(self.heads, features)


# ---- losses ----

def noised(x0, noise, t):
    """cos t·x0 + sin t·noise (noise already scaled by σ_d)."""
    return torch.cos(_per_example(t, x0)) * x0 + torch.sin(_per_example(t, x0)) * noise


def consistency_fn(model, x_t, t, sigma_data, **kwargs):
    """The student's x0 estimate cos t·x_t − sin t·σ_d·F(x_t/σ_d, t)."""
    tb = _per_example(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * sigma_data * model(x_t / sigma_data, t, **kwargs)


@dataclasses.dataclass
class GeneratorDraws:
    """Random numbers of one generator step. Noise is unit normal (scaled by σ_d in the loss).

    w: CFG scales [B]; t, z: the sCM time and noise; t_sample, z_sample: the adversarial sample's
    start; t_disc, z_disc: its re-noising for the discriminator.
    """

    w: torch.Tensor
    t: torch.Tensor
    z: torch.Tensor
    t_sample: torch.Tensor
    z_sample: torch.Tensor
    t_disc: torch.Tensor
    z_disc: torch.Tensor


@dataclasses.dataclass
class DiscriminatorDraws:
    """Random numbers of one discriminator step; the fakes (and t_fake, z_fake) are 2B with
    misaligned pairs, B without."""

    w: torch.Tensor
    t_sample: torch.Tensor
    z_sample: torch.Tensor
    t_fake: torch.Tensor
    z_fake: torch.Tensor
    t_real: torch.Tensor
    z_real: torch.Tensor


def lognormal_times(batch, p_mean, p_std, sigma_data, generator=None):
    """The port's compute_density_for_timestep_sampling_scm: arctan(exp(p_mean + p_std·n) / σ_d)."""
    return torch.atan(torch.exp(p_mean + p_std * torch.randn(batch, generator=generator)) / sigma_data)


def generator_times(batch, scm, ladd, generator=None):
    """sCM times, replaced by ladd.max_time with probability ladd.max_time_prob."""
    t = lognormal_times(batch, scm.p_mean, scm.p_std, scm.sigma_data, generator)
    coin = torch.rand(batch, generator=generator) < ladd.max_time_prob
    return torch.where(coin, torch.full_like(t, ladd.max_time), t)


def guidance_scales(batch, scm, generator=None):
    scales = torch.tensor(scm.guidance_scales, dtype=torch.float32)
    return scales[torch.randint(len(scales), (batch,), generator=generator)]


def sample_generator_draws(shape, scm, ladd, generator=None) -> GeneratorDraws:
    batch, sd = shape[0], scm.sigma_data
    return GeneratorDraws(
        w=guidance_scales(batch, scm, generator),
        t=lognormal_times(batch, scm.p_mean, scm.p_std, sd, generator), z=torch.randn(shape, generator=generator),
        t_sample=generator_times(batch, scm, ladd, generator), z_sample=torch.randn(shape, generator=generator),
        t_disc=lognormal_times(batch, ladd.p_mean, ladd.p_std, sd, generator),
        z_disc=torch.randn(shape, generator=generator))


def sample_discriminator_draws(shape, scm, ladd, generator=None) -> DiscriminatorDraws:
    batch, sd = shape[0], scm.sigma_data
    fakes = 2 * batch if ladd.misaligned_pairs else batch
    fake_shape = (fakes, *shape[1:])
    t_fake = lognormal_times(fakes, ladd.p_mean, ladd.p_std, sd, generator)
    t_real = (lognormal_times(batch, ladd.p_mean, ladd.p_std, sd, generator) if ladd.independent_real_times
              else t_fake[:batch])
    return DiscriminatorDraws(
        w=guidance_scales(batch, scm, generator),
        t_sample=generator_times(batch, scm, ladd, generator), z_sample=torch.randn(shape, generator=generator),
        t_fake=t_fake, z_fake=torch.randn(fake_shape, generator=generator),
        t_real=t_real, z_real=torch.randn(shape, generator=generator))


def scm_loss(student: TrigFlowSana, teacher: TrigFlowSana, x0, caption, caption_mask, null_caption, null_mask,
             draws: GeneratorDraws, step: int, scm):
    """The port's sCM loss. x0: TrigFlow-scale latents [B, C, H, W]; null_caption / null_mask
    already batched. Returns (loss, metrics); only the last student call carries gradient."""
    sd, w, t = scm.sigma_data, draws.w, draws.t
    x_t = noised(x0, sd * draws.z, t)
    x_hat = x_t / sd
    tb = _per_example(t, x0)
    guidance = w * student.model.config.guidance_embeds_scale

    with torch.no_grad():
        both = teacher(torch.cat([x_hat, x_hat]), torch.cat([t, t]), torch.cat([null_caption, caption]),
                       torch.cat([null_mask, caption_mask]))
        uncond, cond = (sd * both).chunk(2)
        dxt_dt = uncond + _per_example(w, x0) * (cond - uncond)

    def wrapped(x, s):
        return student(x, s, caption, caption_mask, guidance=guidance, return_logvar=True)

    cos_sin = torch.cos(t) * torch.sin(t)
    # torch.func.jvp cannot go through the fused SDPA kernels; the port swaps in a vanilla
    # attention processor, the math backend is the same computation.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, f_grad, _ = torch.func.jvp(wrapped, (x_hat, t), (_per_example(cos_sin, x0) * dxt_dt / sd, cos_sin),
                                      has_aux=True)

    f_theta, logvar = wrapped(x_hat, t)
    f_minus = f_theta.detach()
    r = 1.0 if scm.tangent_warmup_steps == 0 else min(1.0, step / scm.tangent_warmup_steps)
    g = -torch.cos(tb) ** 2 * (sd * f_minus - dxt_dt) - r * (torch.cos(tb) * torch.sin(tb) * x_t + sd * f_grad)
    g_norm = torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True)
    g = g / (g_norm + scm.tangent_norm_constant)
    weight = 1.0 / (sd * torch.tan(tb))
    residual = (f_theta - f_minus - g) ** 2
    lv = _per_example(logvar, x0)
    loss = (weight * torch.exp(-lv) * residual + lv).mean()
    metrics = {"scm/loss": loss.detach(), "scm/loss_no_logvar": (weight * residual).mean().detach(),
               "scm/tangent_norm": g_norm.mean(), "scm/logvar": logvar.mean().detach()}
    return loss, metrics


def generator_loss(student, teacher, discriminator: HookedDiscriminator, x0, caption, caption_mask, null_caption,
                   null_mask, draws: GeneratorDraws, step: int, scm, ladd, scm_weight: float = 1.0):
    """sCM + adversarial loss of the student: its one-step x0 estimate from (t_sample, z_sample),
    re-noised to t_disc, scored by the discriminator (heads as they are, no power iteration)."""
    sd = scm.sigma_data
    scm_value, metrics = scm_loss(student, teacher, x0, caption, caption_mask, null_caption, null_mask, draws,
                                  step, scm)
    guidance = draws.w * student.model.config.guidance_embeds_scale
    fake = consistency_fn(student, noised(x0, sd * draws.z_sample, draws.t_sample), draws.t_sample, sd,
                          caption=caption, caption_mask=caption_mask, guidance=guidance)
    logits = discriminator(noised(fake, sd * draws.z_disc, draws.t_disc) / sd, draws.t_disc, caption, caption_mask)
    adversarial = -logits.mean()
    loss = scm_weight * scm_value + ladd.adversarial_weight * adversarial
    return loss, {**metrics, "generator/adversarial": adversarial.detach()}


def discriminator_loss(student, discriminator: HookedDiscriminator, x0, caption, caption_mask,
                       draws: DiscriminatorDraws, scm, ladd):
    """Hinge loss of the heads on the student's (detached) samples, plus misaligned real pairs, vs
    re-noised real latents. Each discriminator call in train mode advances the spectral norms.
    Returns (loss, metrics)."""
    sd = scm.sigma_data
    with torch.no_grad():
        guidance = draws.w * student.model.config.guidance_embeds_scale
        fake = consistency_fn(student, noised(x0, sd * draws.z_sample, draws.t_sample), draws.t_sample, sd,
                              caption=caption, caption_mask=caption_mask, guidance=guidance)
    fake_caption, fake_mask = caption, caption_mask
    if ladd.misaligned_pairs:
        fake = torch.cat([fake, torch.roll(x0, 1, 0)])
        fake_caption, fake_mask = torch.cat([caption, caption]), torch.cat([caption_mask, caption_mask])
    fake_logits = discriminator(noised(fake, sd * draws.z_fake, draws.t_fake) / sd, draws.t_fake, fake_caption,
                                fake_mask)
    real_logits = discriminator(noised(x0, sd * draws.z_real, draws.t_real) / sd, draws.t_real, caption,
                                caption_mask)
    loss = 0.5 * (torch.relu(1.0 - real_logits).mean() + torch.relu(1.0 + fake_logits).mean())
    correct = (real_logits > 0).sum() + (fake_logits < 0).sum()
    metrics = {"discriminator/accuracy": correct / (real_logits.numel() + fake_logits.numel()),
               "discriminator/real_logit": real_logits.mean().detach(),
               "discriminator/fake_logit": fake_logits.mean().detach()}
    return loss, metrics


# ---- the same networks, batch and draws in torch and JAX ----

@dataclasses.dataclass
class Networks:
    """The same weights twice: the torch modules above and the JAX modules."""

    torch_student: TrigFlowSana
    torch_teacher: TrigFlowSana
    torch_discriminator: HookedDiscriminator
    student: nnx.Module
    teacher: nnx.Module
    discriminator: nnx.Module


def build_networks(student_config, teacher_config, config: SanaSprintConfig) -> Networks:
    """Random diffusers models (every weight non-zero, unlike our PixArt-style init), copied into JAX;
    the JAX-only logvar head and the torch discriminator heads are copied the other way round.
    student_config / teacher_config: SanaConfigs, the student's with logvar_head=True."""
    from diffusers import SanaTransformer2DModel  # here, so the head tests need torch only

    torch.manual_seed(0)
    student_t = SanaTransformer2DModel(**student_config.to_diffusers())
    teacher_t = SanaTransformer2DModel(**teacher_config.to_diffusers()).requires_grad_(False)
    heads = [TorchDiscHead(teacher_config.inner_dim) for _ in config.ladd.block_ids]

    student = sana_from_diffusers(student_t.config, student_t.state_dict(), precision=FP32, logvar_head=True)
    teacher = sana_from_diffusers(teacher_t.config, teacher_t.state_dict(), precision=FP32)
    discriminator = discriminator_for(teacher, config, rngs=nnx.Rngs(0))
    load_torch_heads(discriminator, heads)

    torch_student = TrigFlowSana(student_t, logvar=True)
    with torch.no_grad():
        torch_student.logvar_linear.weight.copy_(torch.tensor(np.asarray(student.logvar_linear.kernel[...]).T))
        torch_student.logvar_linear.bias.copy_(torch.tensor(np.asarray(student.logvar_linear.bias[...])))
    torch_teacher = TrigFlowSana(teacher_t)
    return Networks(torch_student, torch_teacher, HookedDiscriminator(torch_teacher, config.ladd.block_ids, heads),
                    student, teacher, discriminator)


def make_batch(batch: int, size: int, caption_length: int, student_config) -> dict[str, np.ndarray]:
    """numpy arrays: unit-scale NHWC latents [B, size, size, C], captions [B, L, caption_channels]
    whose masks [B, L] pad a different tail per example (at least one token, at most half), and
    the null caption [L, caption_channels] with its mask [L]."""
    rng = np.random.default_rng(0)
    length, channels = caption_length, student_config.caption_channels
    tokens = rng.integers(max(1, length // 2), length, batch)
    null_mask = np.zeros(length, np.int64)
    null_mask[:max(1, length // 8)] = 1  # an empty prompt: a few special tokens, then padding
    return dict(
        latents=rng.standard_normal((batch, size, size, student_config.in_channels)).astype(np.float32),
        caption=rng.standard_normal((batch, length, channels)).astype(np.float32),
        caption_mask=(np.arange(length) < tokens[:, None]).astype(np.int64),
        null_caption=rng.standard_normal((length, channels)).astype(np.float32),
        null_caption_mask=null_mask)


@dataclasses.dataclass
class TorchBatch:
    x0: torch.Tensor  # TrigFlow scale (unit latents · σ_d), NCHW
    latents: torch.Tensor  # unit scale, NCHW
    caption: torch.Tensor
    caption_mask: torch.Tensor
    null_caption: torch.Tensor  # batched
    null_mask: torch.Tensor


def torch_batch(batch, sigma_data) -> TorchBatch:
    """make_batch's arrays as torch tensors."""
    latents = torch.from_numpy(batch["latents"].transpose(0, 3, 1, 2).copy())
    size = latents.shape[0]
    return TorchBatch(latents * sigma_data, latents, torch.from_numpy(batch["caption"]),
                      torch.from_numpy(batch["caption_mask"]),
                      torch.from_numpy(batch["null_caption"])[None].expand(size, -1, -1),
                      torch.from_numpy(batch["null_caption_mask"])[None].expand(size, -1))


def torch_generator_loss(nets: Networks, tb: TorchBatch, draws: GeneratorDraws, config: SanaSprintConfig,
                         step: int):
    """generator_loss on the paired networks -> (loss, metrics). The heads run in eval mode (no
    power iteration), as the JAX generator phase reads them."""
    nets.torch_discriminator.heads.eval()
    return generator_loss(nets.torch_student, nets.torch_teacher, nets.torch_discriminator, tb.x0, tb.caption,
                          tb.caption_mask, tb.null_caption, tb.null_mask, draws, step, config.scm, config.ladd,
                          config.scm_weight)


def torch_discriminator_loss(nets: Networks, tb: TorchBatch, draws: DiscriminatorDraws,
                             config: SanaSprintConfig):
    """discriminator_loss on the paired networks -> (loss, metrics). The heads run in train mode:
    each of the two calls (fake, then real) advances u, v in place, as the JAX phase's stats do."""
    nets.torch_discriminator.heads.train()
    return discriminator_loss(nets.torch_student, nets.torch_discriminator, tb.x0, tb.caption, tb.caption_mask,
                              draws, config.scm, config.ladd)


def _to_torch(cls, **draws: jax.Array):
    """cls(**draws) with each JAX draw as a torch tensor, latent-shaped ones NHWC -> NCHW."""
    return cls(**{name: torch.tensor(np.asarray(value).transpose(0, 3, 1, 2) if value.ndim == 4
                                     else np.asarray(value))
                  for name, value in draws.items()})


def _jax_student_sample_draws(key: jax.Array, shape, config: SanaSprintConfig) -> tuple[jax.Array, jax.Array]:
    """(t [B], z [B, H, W, C]) that sana_sprint's student_sample draws from `key`."""
    scm = config.scm
    t_key, z_key = jax.random.split(key)
    return (jax_ladd.generator_times(t_key, shape[0], scm.p_mean, scm.p_std, config.ladd, scm.sigma_data),
            jax.random.normal(z_key, shape))


# The two functions below mirror the key splits of sana_sprint's generator_loss (with scm_loss) and
# discriminator_loss; if those change, the parity test fails and these need the same change.

def jax_generator_draws(key: jax.Array, shape, config: SanaSprintConfig) -> GeneratorDraws:
    """The random numbers the recipe's generator loss draws from `key`, as torch tensors (NCHW).
    shape: the NHWC latent shape."""
    scm, sd, batch = config.scm, config.scm.sigma_data, shape[0]
    w_key, scm_key, sample_key, t_key, z_key = jax.random.split(key, 5)
    scm_t_key, scm_z_key = jax.random.split(scm_key)
    t_sample, z_sample = _jax_student_sample_draws(sample_key, shape, config)
    return _to_torch(
        GeneratorDraws, w=jax_scm.sample_guidance_scales(w_key, batch, scm),
        t=jax_trigflow.lognormal_times(scm_t_key, batch, scm.p_mean, scm.p_std, sd),
        z=jax.random.normal(scm_z_key, shape), t_sample=t_sample, z_sample=z_sample,
        t_disc=jax_ladd.discriminator_times(t_key, batch, config.ladd, sd), z_disc=jax.random.normal(z_key, shape))


def jax_discriminator_draws(key: jax.Array, shape, config: SanaSprintConfig) -> DiscriminatorDraws:
    """The random numbers the recipe's discriminator loss draws from `key`, as torch tensors (NCHW).
    shape: the NHWC latent shape."""
    ladd, sd, batch = config.ladd, config.scm.sigma_data, shape[0]
    w_key, sample_key, tf_key, tr_key, zf_key, zr_key = jax.random.split(key, 6)
    fakes = 2 * batch if ladd.misaligned_pairs else batch
    t_fake = jax_ladd.discriminator_times(tf_key, fakes, ladd, sd)
    t_real = (jax_ladd.discriminator_times(tr_key, batch, ladd, sd) if ladd.independent_real_times
              else t_fake[:batch])
    t_sample, z_sample = _jax_student_sample_draws(sample_key, shape, config)
    return _to_torch(
        DiscriminatorDraws, w=jax_scm.sample_guidance_scales(w_key, batch, config.scm), t_sample=t_sample,
        z_sample=z_sample, t_fake=t_fake, z_fake=jax.random.normal(zf_key, (fakes, *shape[1:])), t_real=t_real,
        z_real=jax.random.normal(zr_key, shape))
