"""DDO (Zheng et al. 2025, "Direct Discriminative Optimization: Your Likelihood-Based Visual
Generative Model is Secretly a GAN Discriminator", arXiv 2503.01103): GAN-style fine-tuning with
the model's own likelihood ratio as the discriminator.

With r(x) = log p_theta(x) - log p_ref(x), the discriminator is sigma(beta r(x)), and the loss
over real data and samples of the reference is

    L = -E_data log sigma(beta r(x)) - alpha E_{x ~ p_ref} log(1 - sigma(beta r(x)))

(the core ``ddo`` loss). For a diffusion model r is the difference of ELBOs, estimated like
Diffusion-DPO's implicit reward: r(x) ~ s_theta(x) - s_ref(x) with s = -w(t) ||target -
prediction||^2 at one t and noise (:mod:`diffalign.diffusion.likelihood`). Here each real image
is paired with one sample of the reference drawn *for the same caption*, and both are noised at
the same t and noise, which lowers the variance of the estimate; the two terms of the loss stay
separate.

Self-play: the reference is the policy as it was at the start of the current round, kept as
:class:`~diffalign.diffusion.shadow.ShadowWeights` (only the trained tensors), and refreshed to
the policy every ``objective.refresh_every`` optimiser steps; its samples are drawn during the
step, without gradients, with the stochastic sampler of :mod:`diffalign.diffusion.logprob`
(``objective.sample_steps``, ``sample_eta``; ``sample_guidance_scale`` 1 samples p_ref itself,
as the paper's guidance-free setting). A sample is a pure function of (seed, example position,
reference weights), and the reference is saved in every checkpoint, so resume is exact.

Defaults: the paper's hyperparameters (beta, alpha, round length) could not be read here; the
recipes say which values they use and why. alpha defaults to 1 (the plain GAN discriminator loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.logprob import sample_trajectories
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.objectives.offline import OfflineDenoisingObjective

if TYPE_CHECKING:
    from diffalign.train.config import ObjectiveConfig

Tensor = torch.Tensor


class DDO(OfflineDenoisingObjective):
    """Real images against the round's reference samples; see the module docstring."""

    dataset = "images"
    shadow_weights = True
    frozen_reference = False
    loss_kinds = ("pairwise",)

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.refresh_every = config.refresh_every
        self.steps, self.eta, self.guidance_scale = config.sample_steps, config.sample_eta, config.sample_guidance_scale
        self.uncond = backbone.encode_prompts([""]) if self.guidance_scale != 1.0 else None
        self.reference_weights: ShadowWeights | None = None
        self.optimizer_steps = 0

    # --- the trainer's hooks: the round's reference, saved with every checkpoint ----------
    def attach(self, denoiser: nn.Module) -> list[Any]:
        self.reference_weights = ShadowWeights(denoiser)
        return [self]

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.refresh_every == 0:  # a new round: the reference becomes the policy
            self.reference_weights.update(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference_weights.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference_weights.load_state_dict(state["reference"])
        self.optimizer_steps = int(state["optimizer_steps"])

    # --- one batch -----------------------------------------------------------------------
    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """The shared timestep and noise of each (real, sample) pair, and the seed of its sample."""
        return {**super().draw(n, latent_shape, generator),
                "sample_seed": torch.randint(0, 2**62, (n,), generator=generator)}

    @torch.no_grad()
    def reference_samples(self, backbone: Backbone, cond: Conditioning, seeds: Tensor,
                          latent_shape: tuple[int, ...]) -> Tensor:
        """One sample of the round's reference per caption (B, C, h, w), in one batched walk; the
        start and step noise of item i come from its own seed, so a sample never depends on its batch."""
        noise, step_noise = [], []
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            noise.append(torch.randn((1, *latent_shape), generator=g))
            step_noise.append(torch.randn((1, self.steps, *latent_shape), generator=g))
        device = cond.embeds.device  # the seeds may stay on the CPU: they are read as numbers
        uncond = None if self.uncond is None else self.uncond.to(device).repeat_items(len(seeds))
        trajectory = sample_trajectories(backbone, torch.cat(noise).to(device), cond, steps=self.steps, eta=self.eta,
                                         guidance_scale=self.guidance_scale, uncond=uncond,
                                         step_noise=torch.cat(step_noise), denoiser=self.reference_weights.denoiser())
        return trajectory.final.to(device)

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **targets: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``latents`` (B, 1, C, h, w) real images; the loss of each against a fresh reference sample."""
        fake = self.reference_samples(backbone, cond, randomness["sample_seed"], tuple(latents.shape[2:]))
        pairs = torch.stack([latents[:, 0], fake.to(latents.dtype)], dim=1)
        loss, metrics = super().__call__(backbone, pairs, cond, randomness, policy, self.reference_weights.denoiser())
        metrics["round"] = torch.tensor(float(self.optimizer_steps // self.refresh_every), device=loss.device)
        return loss, metrics

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        return self.spec.fn(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=self.beta, **options)
