"""DisCO (Li et al. 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained
Optimization", NeurIPS 2025, arXiv 2505.12366) on the denoising MDP: raise the scores of a group's positive
samples, lower those of its negatives, under a KL constraint, with no clipping and no advantage scaling.

A round's group (K samples of one prompt) splits into positives and negatives: DisCO's rewards are binary
(correct or not); with a real-valued reward a sample is positive when it beats its prompt's mean (the sign of
Flow-GRPO's advantage). A group with no positive or no negative has no discriminative signal and is skipped,
as in the authors' code. Each unit is one group at one denoising step k, and a sample's score is its step's
log-probability under the policy (the authors' log-likelihood score, "log-L", is the mean token log-probability
of an answer; a random step's is an estimate of the mean over a trajectory's steps). The objective is the
distributionally robust one (Eq. 11, DisCO's default over the plain difference DisCO-b):

    J = mean_{o+} s(o+) - tau log mean_{o-} exp(s(o-) / tau),

summed over the valid groups and divided by all groups, and the KL to the sampling policy,
KL = mean(log p_old - log p_theta) over the units' steps (the authors' "kl" estimate), is held below delta
by the squared-hinge penalty beta [KL - delta]_+^2, whose gradient the authors' code takes as
stop_gradient(beta [KL - delta]_+) * grad KL (it halves the factor 2; kept as theirs):

    L = -J + stop_gradient(beta [KL - delta]_+) KL.

Defaults are the authors' log-L scripts (scripts/train/run_disco_logL_*.sh): tau 10, beta 1e3, delta 1e-4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.logprob import step_log_prob
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.grpo import round_advantages
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


def disco_objective(scores: Tensor, positive: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(J summed over the valid groups, number of valid groups) for (G, K) scores and a (G, K) positive mask."""
    negative = ~positive
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return scores.sum() * 0.0, valid.sum()
    scores, positive, negative = scores[valid], positive[valid], negative[valid]
    positive_mean = (scores * positive).sum(dim=1) / positive.sum(dim=1)
    scaled = (scores / tau).masked_fill(~negative, float("-inf"))
    robust = tau * (torch.logsumexp(scaled, dim=1) - negative.sum(dim=1).to(scores.dtype).log())
    return (positive_mean - robust).sum(), valid.sum()


def kl_penalty(kl: Tensor, beta: float, delta: float) -> Tensor:
    """The constraint's penalty stop_gradient(beta [KL - delta]_+) KL (the authors' gradient of beta [KL - delta]_+^2
    with its factor 2 dropped; module docstring)."""
    return (beta * (kl - delta)).clamp(min=0).detach() * kl


@dataclass
class DisCOOptions:
    # the temperature of the robust log-mean-exp over a group's negatives (the authors' log-L run)
    tau: float = ranged(10.0, "(0, inf)")
    # the squared-hinge penalty kl_beta [KL - kl_delta]_+^2 that holds the KL to the sampler below kl_delta
    kl_beta: float = ranged(1000.0, "[0, inf)")
    kl_delta: float = ranged(1.0e-4, "[0, inf)")


class DisCO(OnlineObjective):
    """The discriminative constrained objective on recorded groups; see the module docstring.

    Called with ``latents`` (B, K, T + 1, C, h, w) groups of trajectories, ``randomness["step"]`` (B,) the step
    trained for each group, and the targets ``positive`` (B, K), and ``old_log_probs`` (B, K, T).
    """

    paper = "Li et al. 2025, arXiv 2505.12366"

    loss_kinds = ("discriminative",)
    own_losses = ("disco",)
    group_size = 8
    shared_noise = False
    takes_labels = False

    Options = DisCOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        options = self.options_of(config)
        self.tau, self.kl_beta, self.kl_delta = options.tau, options.kl_beta, options.kl_delta
        self.record_sampler(config, backbone)

    def training_units(self, round_) -> dict[str, Any]:
        """Every group, each sample marked positive when it beats its prompt's mean reward."""
        advantages, _ = round_advantages(round_, "group")
        g, k = round_.rewards.shape
        return {"latents": round_.latents, "prompt_of": torch.arange(g),
                "targets": {"positive": (advantages > 0).view(g, k), "old_log_probs": round_.log_probs}}

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, positive: Tensor, old_log_probs: Tensor,
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, k = latents.shape[:2]
        step = randomness["step"].repeat_interleave(k)
        log_prob = step_log_prob(backbone, latents.flatten(0, 1), step, cond.repeat_items(k), denoiser=policy,
                                 **self.sampler_settings(b * k, latents.device))
        old = old_log_probs.flatten(0, 1)[torch.arange(b * k, device=step.device), step].to(log_prob)
        objective, valid = disco_objective(log_prob.view(b, k), positive.bool(), self.tau)
        kl = (old - log_prob).mean()
        loss = -objective / b + kl_penalty(kl, self.kl_beta, self.kl_delta)
        metrics = {"disco_objective": objective.detach() / b, "kl": kl.detach(),
                   "kl_over_delta": (kl.detach() > self.kl_delta).float(), "valid_groups": valid.float() / b}
        return loss, metrics
