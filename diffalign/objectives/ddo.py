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

Self-play on the round driver (:mod:`diffalign.train.online`): round r pairs the next
``online.groups_per_round`` real images of the run's order with one sample each of the round's reference
for the same caption, drawn at the round's start with the stochastic sampler of
:mod:`diffalign.diffusion.logprob` (``objective.sample_steps``, ``sample_eta``; ``sample_guidance_scale`` 1
samples p_ref itself, as the paper's guidance-free setting). The reference is the policy as it was at the
start of the round, kept as :class:`~diffalign.diffusion.shadow.ShadowWeights` (only the trained tensors)
and moved to the policy every ``online.steps_per_round`` optimiser steps. Rounds are written to disk and the
reference is saved in every checkpoint, so resume is exact.

beta and alpha from the paper: its diffusion grid is alpha in [0.5, 6] and beta in [0.01, 0.1] (ablations
at beta 0.05, alpha 4), for r = log p_theta(x) - log p_ref(x) in nats, estimated as a difference of
denoising errors summed over the D elements of x (EDM's loss). The score here is a per-element mean, so
the same discriminator takes beta_here = D * beta_paper, the per-noise-level weight taken as 1 (as
Diffusion-DPO's beta absorbs it): the toy's 4x16x16 latents give 0.05 * 1024 = 51, SDXL's 4x128x128 at
1024 px 0.05 * 65536 = 3277. alpha carries over unchanged; the recipes use the ablation's 4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.offline import OfflineDenoisingObjective

if TYPE_CHECKING:
    from diffalign.train.config import ObjectiveConfig

Tensor = torch.Tensor


class DDO(OfflineDenoisingObjective, OnlineObjective):
    """Real images against the round's reference samples; see the module docstring.

    Called with ``latents`` (B, 2, C, h, w): each real image, then the reference's sample for its caption.
    """

    shadow_weights = True
    frozen_reference = False
    loss_kinds = ("pairwise",)
    group_size = 1  # one sample of the reference per real image
    group_size_fixed = True
    shared_noise = False
    takes_labels = False
    real_data = True
    scored = False  # the real image is the positive, the sample the negative: no reward, no label
    keeps_trajectories = False

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.reference_weights: ShadowWeights | None = None
        self.optimizer_steps = 0

    # --- the trainer's hooks: the round's reference, saved with every checkpoint ----------
    def attach(self, denoiser: nn.Module) -> list[Any]:
        self.reference_weights = ShadowWeights(denoiser)
        return [self]

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.steps_per_round == 0:  # a new round: the reference becomes the policy
            self.reference_weights.update(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference_weights.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference_weights.load_state_dict(state["reference"])
        self.optimizer_steps = int(state["optimizer_steps"])

    # --- the round and the loss ----------------------------------------------------------
    def sampling_denoiser(self) -> nn.Module:
        """The round's samples are the reference's (the policy at the round's start)."""
        return self.reference_weights.denoiser()

    def training_units(self, round_) -> dict[str, Any]:
        """Each real image with the reference's sample for its caption."""
        samples = round_.latents[:, 0, -1]
        return {"latents": torch.stack([round_.real.to(samples.dtype), samples], dim=1),
                "prompt_of": torch.arange(len(round_.prompts)), "targets": {}}

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **targets: Tensor) -> tuple[Tensor, dict[str, Any]]:
        loss, metrics = super().__call__(backbone, latents, cond, randomness, policy, self.reference_weights.denoiser())
        metrics["round"] = torch.tensor(float(self.optimizer_steps // self.steps_per_round), device=loss.device)
        return loss, metrics

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        return self.spec.fn(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=self.beta, **options)
