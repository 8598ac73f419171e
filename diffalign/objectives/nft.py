"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv 2509.16117): online RL on the forward process, with no sampler likelihoods.

A round's samples are scored and given group-relative advantages as in Flow-GRPO
(:func:`diffalign.objectives.grpo.group_advantages`), mapped to an optimality probability
r = clip(A, -5, 5) / 10 + 1/2 in [0, 1]. Each clean sample x_0 is noised afresh at one of the sampler's
noise levels, x_t = a_t x_0 + b_t eps, and the trained prediction v_theta and the "old" policy's v_old define
an implicit positive and an implicit negative policy (the paper's Eq. 6-8):

    v+ = (1 - beta) v_old + beta v_theta,        v- = (1 + beta) v_old - beta v_theta.

Each is regressed onto the sample through its clean estimate x0(v) (x_t - sigma v on a flow model; the
epsilon, v or sample parametrisation elsewhere, the estimate being affine in the prediction), the positive
one weighted by r and the negative one by 1 - r, each squared error divided by its own detached mean
absolute error (the authors' adaptive weighting), all scaled by 5 / beta as the authors' train_nft_sd3.py:

    L = 5 / beta * [ r ||x0(v+) - x_0||^2 / w+ + (1 - r) ||x0(v-) - x_0||^2 / w- ] + beta_KL ||v_theta - v_ref||^2.

Good samples pull the policy towards them, bad ones push it away, without any log-probability, so
the sampler may be any solver. The old policy is an EMA of the trained weights, which also samples
the rounds, with decay min(0.001 * step, 0.5) after each optimiser step (the authors' decay_type 1);
the reference for the KL is the base (LoRA disabled, or the frozen copy). Defaults follow the authors'
SD3.5 configs: beta 1, KL weight 1e-4, advantages clipped at 5, no classifier-free guidance (the method
is CFG-free: sample with ``objective.sample_guidance_scale=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.objectives.forward_process import ForwardProcessObjective
from diffalign.objectives.grpo import AdvantageOptions

Tensor = torch.Tensor
OLD_DECAY_MAX = 0.5  # the authors' decay_type 1: min(0.001 * step, 0.5)
WEIGHT_FLOOR = 1e-5


def optimality(advantage: Tensor, clip: float) -> Tensor:
    """r = clip(A, -clip, clip) / (2 clip) + 1/2: the advantage as a probability of being the better sample."""
    return (advantage.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def adaptive_squared_error(estimate: Tensor, target: Tensor) -> Tensor:
    """(B,) mean squared error over each sample's elements, divided by its detached mean absolute error."""
    error = (estimate - target).flatten(1)
    weight = error.detach().abs().double().mean(dim=1, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return (error.pow(2) / weight).mean(dim=1).float()


@dataclass
class NFTOptions(AdvantageOptions):
    # weight of the KL to the reference (DiffusionNFT's kl_beta)
    kl_coef: float = ranged(1e-4, "[0, inf)")
    # the guidance strength beta of the implicit positive and negative policies (1 - beta) v_old + beta v and
    # (1 + beta) v_old - beta v (DiffusionNFT's config.beta)
    beta: float = ranged(1.0, "(0, inf)")


class DiffusionNFT(ForwardProcessObjective):
    """Negative-aware fine-tuning on the forward process; see the module docstring."""

    paper = "Zheng et al. 2025, arXiv 2509.16117"

    loss_kinds = ("nft",)
    own_losses = ("nft",)
    shadow_weights = True

    Options = NFTOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.options = options = self.options_of(config)
        self.beta, self.advantage_clip, self.kl_coef = options.beta, options.advantage_clip, options.kl_coef
        self.sample_steps, self.eta = config.sample_steps, config.sample_eta

    # --- the old policy: an EMA of the trained weights that samples the rounds ---------------
    def trailing_schedule(self) -> tuple[float, int]:
        return OLD_DECAY_MAX, 1

    def sampling_denoiser(self) -> nn.Module:
        return self.trailing.denoiser()

    # --- the loss ----------------------------------------------------------------------------
    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, advantage: Tensor,
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        noised = self.noised(backbone, latents, cond, randomness, policy)
        x0 = noised.x0
        prediction = noised.predict(policy)
        with torch.no_grad():
            old = noised.predict(self.trailing.denoiser())
        positive = noised.clean((1 - self.beta) * old + self.beta * prediction)
        negative = noised.clean((1 + self.beta) * old - self.beta * prediction)
        r = optimality(advantage.to(x0), self.advantage_clip)
        per_sample = (r * adaptive_squared_error(positive, x0) + (1 - r) * adaptive_squared_error(negative, x0)) / self.beta
        policy_loss = (per_sample * self.advantage_clip).mean()
        metrics = {"policy_loss": policy_loss.detach(), "optimality_mean": r.mean(),
                   "old_deviation": (prediction.detach() - old).pow(2).mean()}
        loss = policy_loss
        if self.kl_coef > 0:
            kl = noised.reference_squared_difference(prediction, reference)
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
