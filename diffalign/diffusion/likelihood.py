"""The denoising-likelihood proxy: a diffusion model's per-sample score s(x).

For items x_0 of a group (winner and loser of a pair, every image of a ranked list) that
share one timestep t and one noise eps, the score of an item is

    s(x_0) = - w(t) * mean_{c,h,w} (f_theta(x_t, t, c) - target(x_0, eps, t))^2

where x_t is x_0 noised at t and the target follows the model's prediction type. Minus the
squared error is, up to constants and the weighting, the ELBO of x_0 at t (Ho et al. 2020
Eq. 14; Diffusion-DPO, Wallace et al. 2023, Eq. 14 uses its difference between policy and
reference). Higher means more likely, as for an LM's log-prob.

:func:`noised_group` draws t and eps once per group and noises every item; the policy and
the reference then score the same noised inputs (:func:`group_scores`). All items of all
groups go through the denoiser in one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffalign.diffusion.backbones import Backbone, Conditioning
from diffalign.diffusion.lora import reference_denoiser
from diffalign.diffusion.schedule import Schedule, TimestepSampler

Tensor = torch.Tensor


@dataclass
class NoisedGroup:
    """B groups of K items, flattened to B*K rows (group-major: row = b*K + k)."""

    noisy: Tensor  # (B*K, C, h, w)
    target: Tensor  # (B*K, C, h, w)
    model_timesteps: Tensor  # (B*K,)
    weight: Tensor  # (B*K,)
    cond: Conditioning  # B*K rows
    groups: int
    items: int


def noised_group(
    latents: Tensor,
    cond: Conditioning,
    schedule: Schedule,
    *,
    timesteps: Tensor | None = None,
    noise: Tensor | None = None,
    sampler: TimestepSampler | None = None,
    weighting: str = "uniform",
    generator: torch.Generator | None = None,
) -> NoisedGroup:
    """Noise every item of each group with the group's shared timestep and noise.

    Args:
        latents: (B, K, C, h, w) clean latents, K items per group.
        cond: conditioning of the B groups' prompts (one row per group).
        timesteps: (B,) integer timesteps; drawn from ``sampler`` when None.
        noise: (B, C, h, w) noise; drawn from ``generator`` when None.
    """
    b, k = latents.shape[:2]
    x0 = latents.flatten(0, 1)
    device = x0.device
    if timesteps is None:
        timesteps = (sampler or TimestepSampler()).sample(b, schedule.num_timesteps, generator)
    if noise is None:
        noise = torch.randn(latents[:, 0].shape, generator=generator, dtype=torch.float32).to(x0.dtype)
    t = timesteps.to(device).repeat_interleave(k)
    eps = noise.to(device=device, dtype=x0.dtype).repeat_interleave(k, dim=0)
    return NoisedGroup(
        noisy=schedule.add_noise(x0, eps, t),
        target=schedule.target(x0, eps, t),
        model_timesteps=schedule.model_timesteps(t),
        weight=schedule.loss_weight(t, weighting),
        cond=cond.repeat_items(k),
        groups=b,
        items=k,
    )


def _prediction(backbone: Backbone, group: NoisedGroup, denoiser: nn.Module | None) -> Tensor:
    """(B*K, C, h, w) prediction of ``denoiser`` (default: the backbone's) on the noised group."""
    net = denoiser or backbone.denoiser
    dtype = next(net.parameters()).dtype
    return backbone.predict(group.noisy.to(dtype), group.model_timesteps, group.cond.to(dtype=dtype), denoiser=net)


def denoising_scores(backbone: Backbone, group: NoisedGroup, denoiser: nn.Module | None = None) -> Tensor:
    """(B, K) scores ``-w(t) * mean squared error`` of ``denoiser`` (default: the backbone's)."""
    pred = _prediction(backbone, group, denoiser)
    err = (pred.float() - group.target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return -(group.weight.to(err.device) * err).view(group.groups, group.items)


def location_scores(backbone: Backbone, group: NoisedGroup, denoiser: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """The score split over latent locations, (B*K, h, w), and the prediction (B*K, C, h, w).

    ``s_hw = -w(t) sum_c (f - target)^2_{c,h,w} / (C h w)``: the locations' scores add up to
    :func:`denoising_scores`' score, as a completion's token log-probs add up to its log-prob.
    """
    pred = _prediction(backbone, group, denoiser)
    per_location = (pred.float() - group.target.float()).pow(2).sum(dim=1) / pred[0].numel()
    return -group.weight.to(pred.device).view(-1, 1, 1) * per_location, pred


def group_scores(
    backbone: Backbone,
    group: NoisedGroup,
    *,
    policy: nn.Module | None = None,
    reference: nn.Module | None = None,
    need_reference: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Policy scores (with grad) and reference scores (no grad) on the same noised group.

    ``policy`` is the module to train through, e.g. the DDP/FSDP wrapper accelerate returns
    (its forward is what synchronises gradients); default: the backbone's denoiser. The
    reference is ``reference`` when given (a frozen copy, e.g. in bf16), else the policy's
    own base with its LoRA adapters disabled: no second copy of the weights.
    """
    scores = denoising_scores(backbone, group, denoiser=policy)
    if not need_reference:
        return scores, None
    with torch.no_grad(), reference_denoiser(backbone.denoiser, reference) as frozen:
        ref = denoising_scores(backbone, group, denoiser=frozen)
    return scores, ref
