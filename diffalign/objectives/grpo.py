"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470):
group-relative policy optimisation on the denoising MDP.

Each round samples K images per prompt with the recorded stochastic sampler (the flow SDE of Flow-GRPO's
Eq. 9 on flow models; DDIM with eta, as DDPO, on epsilon/v models: :mod:`diffalign.diffusion.logprob`),
scores them with a reward model, and gives each sample its group-relative advantage (Eq. 4)

    A_i = (r_i - mean(r of the prompt)) / (std + 1e-4),

the mean over the round's samples of the same prompt, the standard deviation over all of the round's
rewards (``advantage_std="global"``, Flow-GRPO's recipes) or over the prompt's (``"group"``), as the
authors' ``PerPromptStatTracker`` computes them. Each training unit is one trajectory at one denoising
step k, with the PPO-clipped surrogate on the ratio of the step's probability under the policy to the
one recorded when it was sampled, plus a KL to the reference (Eq. 6-7 as the authors' train_sd3.py):

    rho   = p_theta(x_{k+1} | x_k, c) / p_old(x_{k+1} | x_k, c)
    L     = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta_KL ||mu_theta - mu_ref||^2 / (2 sigma_k^2),

A clipped to [-5, 5] first. Log-probabilities are the per-element means of the Gaussian step densities,
as the authors' (and DDPO's) step functions compute them; the KL is the closed form between the two
Gaussian steps, which share sigma_k, averaged over elements. The policy's guidance at training is the
sampler's (Flow-GRPO's ``train.cfg``). At the first inner step of a round the policy is the sampler, so
rho is 1 up to the rounding of another batch composition (exactly 1 in the same batch).

Defaults follow the authors' SD3.5 PickScore recipe (config/grpo.py ``pickscore_sd3``): clip range 1e-4,
advantages clipped at 5, KL weight 0.01, global standard deviation, 10 sampler steps with noise level
0.7 and guidance 4.5, groups of 24 images (toy: 8), no shared starting noise (``online.shared_noise``
gives DanceGRPO's shared noise per group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning, reference_denoiser
from diffalign.diffusion.logprob import step_distribution, transition_log_prob
from diffalign.errors import UserError
from diffalign.objectives.base import OnlineObjective

from diffalign.config import ObjectiveConfig, ranged

Tensor = torch.Tensor
STD_EPSILON = 1e-4  # the authors' PerPromptStatTracker


@dataclass
class AdvantageOptions:
    # weight of the KL to the reference (Flow-GRPO's and DiffusionNFT's beta)
    kl_coef: float = ranged(0.01, "[0, inf)")
    # advantages are clipped to [-advantage_clip, advantage_clip]
    advantage_clip: float = ranged(5.0, "(0, inf)")
    # the standard deviation that scales the advantages: of all the round's rewards (global) or of the prompt's group
    advantage_std: str = ranged("global", ("global", "group"))


@dataclass
class GRPOOptions(AdvantageOptions):
    # p_theta / p_sampler is clipped to [1 - ratio_clip, 1 + ratio_clip] (Flow-GRPO's clip_range)
    ratio_clip: float = ranged(1e-4, "(0, 1)")


def group_advantages(rewards: Tensor, prompts: list[str], *, std: str = "global") -> Tensor:
    """(G, K) advantages of a round's (G, K) rewards, G groups of one prompt each: the reward minus the mean of all
    the round's samples of that prompt, over the standard deviation of all rewards ("global") or of the prompt's
    ("group"), plus 1e-4 (population standard deviations, as numpy's)."""
    if std not in ("global", "group"):
        raise UserError(f"objective.options.advantage_std={std!r}: choose global or group")
    rewards = rewards.double()
    advantages = torch.empty_like(rewards)
    spread_all = rewards.std(unbiased=False)
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        same = rewards[rows]
        spread = spread_all if std == "global" else same.std(unbiased=False)
        advantages[rows] = (same - same.mean()) / (spread + STD_EPSILON)
    return advantages.float()


def round_advantages(round_, std: str) -> tuple[Tensor, Tensor]:
    """(G * K,) advantages of a round's samples (:func:`group_advantages`) and (G * K,) each sample's prompt index,
    group-major; a round without rewards (people's pair labels) has none to give."""
    if round_.rewards is None:
        raise UserError("group-relative objectives need a reward for every sample (online.reward); people's pair "
                        "labels give no advantages")
    g, k = round_.rewards.shape
    prompts = [p for p in round_.prompts for _ in range(k)]
    return group_advantages(round_.rewards.reshape(-1), prompts, std=std), torch.arange(g).repeat_interleave(k)


def clipped_surrogate(log_ratio: Tensor, advantage: Tensor, clip: float) -> Tensor:
    """(B,) PPO's clipped surrogate loss max(-A rho, -A clip(rho, 1 - clip, 1 + clip)), rho = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip))


class FlowGRPO(OnlineObjective):
    """The clipped group-relative policy gradient on recorded trajectories; see the module docstring.

    Called with ``latents`` (B, 1, T + 1, C, h, w) trajectories, ``randomness["step"]`` (B,) the step trained
    for each, and the targets ``advantage`` (B,) and ``old_log_probs`` (B, T) of its round.
    """

    paper = "Liu et al. 2025, arXiv 2505.05470"

    loss_kinds = ("policy-gradient",)
    own_losses = ("ppo_clip",)
    group_size = 8
    shared_noise = False
    takes_labels = False

    Options = GRPOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        options = self.options_of(config)
        self.clip, self.kl_coef = options.ratio_clip, options.kl_coef
        self.advantage_clip, self.advantage_std = options.advantage_clip, options.advantage_std
        self.record_sampler(config, backbone)

    def training_units(self, round_) -> dict[str, Any]:
        """Every trajectory of the round with its advantage and its recorded step log-probabilities."""
        advantages, prompt_of = round_advantages(round_, self.advantage_std)
        return {"latents": round_.latents.flatten(0, 1)[:, None], "prompt_of": prompt_of,
                "targets": {"advantage": advantages, "old_log_probs": round_.log_probs.flatten(0, 1)}}

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, advantage: Tensor, old_log_probs: Tensor,
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        trajectories, step = latents[:, 0], randomness["step"]
        rows = torch.arange(len(step), device=step.device)
        sampler = self.sampler_settings(len(step), latents.device)
        distribution = lambda net: step_distribution(backbone, trajectories, step, cond, denoiser=net,  # noqa: E731
                                                     **sampler)
        mean, std = distribution(policy)
        std = std.view(-1, *([1] * (mean.dim() - 1)))
        log_prob = transition_log_prob(trajectories[rows, step + 1], mean, std, self.sampler)
        old = old_log_probs[rows, step].to(log_prob)
        log_ratio, weight = self.log_ratio(log_prob, old, backbone=backbone, mean=mean, std=std,
                                           sample=trajectories[rows, step + 1], rows=rows, step=step, **targets)
        clipped_advantage = advantage.to(log_prob).clamp(-self.advantage_clip, self.advantage_clip)
        policy_loss = (clipped_surrogate(log_ratio, clipped_advantage, self.clip) * weight).mean()
        ratio = torch.exp(log_ratio.detach())
        metrics = {"policy_loss": policy_loss.detach(), "ratio_mean": ratio.mean(), "ratio_max": ratio.max(),
                   "ratio_min": ratio.min(), "clip_fraction": ((ratio - 1).abs() > self.clip).float().mean(),
                   "advantage_mean": advantage.float().mean(), "advantage_abs": advantage.float().abs().mean()}
        loss = policy_loss
        if self.kl_coef > 0:
            with torch.no_grad(), reference_denoiser(backbone.denoiser, reference) as frozen:
                ref_mean, _ = distribution(frozen)
            kl = ((mean - ref_mean) ** 2).flatten(1).mean(dim=1) / (2 * std.flatten() ** 2)
            loss = loss + self.kl_coef * kl.mean()
            metrics["kl"] = kl.mean().detach()
        return loss, metrics

    def log_ratio(self, log_prob: Tensor, old_log_prob: Tensor, **step: Any) -> tuple[Tensor, Tensor]:
        """(B,) log rho of each unit and (B,) its weight in the mean of the clipped surrogate: the step
        log-probability under the policy minus the sampler's, every unit weighted 1. ``step`` carries the backbone,
        the step's mean and std under the policy, the sampled next latent, the units' rows and steps and the
        round's other targets, for ratios built otherwise (GRPO-Guard's)."""
        return log_prob - old_log_prob, torch.ones_like(log_prob)
