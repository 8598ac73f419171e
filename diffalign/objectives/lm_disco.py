"""DisCO on a causal LM (Li et al. 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained
Optimization", arXiv 2505.12366; the setting the paper was written for): each round pi_t samples K completions per
prompt, the reward splits each group into positives and negatives, and the policy raises the positives' scores and
lowers the negatives' under a KL constraint to the sampler, with no clipping and no advantage scaling.

The score of a completion is its mean token log-probability under the policy (the authors' log-likelihood score,
"log-L", their default). Per group, J = mean_{o+} s(o+) - tau log mean_{o-} exp(s(o-) / tau) (Eq. 11, the
distributionally robust form; :func:`diffalign.objectives.disco.disco_objective`, shared with the diffusion loop),
summed over the batch's valid groups and divided by its groups. The KL to the sampler pi_t is the mean over the
batch's completion tokens of log pi_t - log pi_theta (the authors' estimate), held below delta by
stop_gradient(beta [KL - delta]_+) KL. A completion is positive when its reward beats its group's mean (DisCO's
rewards are binary, correct or not; this is their sign for a real-valued reward); a group with no positive or no
negative carries no signal and is not trained. Defaults: the authors' log-L scripts (tau 10, beta 1e3, delta 1e-4).
A batch is ``train.batch_size`` whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.lm import completion_logps
from diffalign.objectives.disco import DisCO, DisCOOptions, disco_objective, kl_penalty
from diffalign.objectives.lm_online import LanguageModelSelfPlay, LMSamplingOptions

Tensor = torch.Tensor


@dataclass
class LMDisCOOptions(LMSamplingOptions, DisCOOptions):
    """DisCO's temperature and KL constraint, and the rounds' sampling."""


class LanguageModelDisCO(LanguageModelSelfPlay):
    """The discriminative constrained objective on whole groups of completions; see the module docstring."""

    paper = DisCO.paper

    loss_kinds = ("discriminative",)
    own_losses = ("disco",)
    group_size = 8
    Options = LMDisCOOptions

    def __init__(self, config, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        options = self.options_of(config)
        self.tau, self.kl_beta, self.kl_delta = options.tau, options.kl_beta, options.kl_delta

    def pairs(self, rewards, generator):
        """Each group that has a positive and a negative, whole, with its (N, K) positive mask."""
        positive = rewards > rewards.mean(dim=1, keepdim=True)
        valid = positive.any(dim=1) & ~positive.all(dim=1)
        groups = torch.nonzero(valid).flatten()
        items = torch.arange(rewards.shape[1]).expand(len(groups), -1)
        return groups, items, {"positive": positive[groups]}

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, k = batch["inputs"], batch["list_size"]
        scores, lengths = completion_logps(policy, inputs, average=True)  # rank-major rows: k * B + i
        with torch.no_grad():
            old, _ = completion_logps(self.previous_round(), inputs)
        kl = (old - scores * lengths).sum() / lengths.sum()  # per completion token
        b = len(scores) // k
        objective, valid = disco_objective(scores.view(k, b).T, batch["targets"]["positive"].bool(), self.tau)
        loss = -objective / b + kl_penalty(kl, self.kl_beta, self.kl_delta)
        metrics = {"disco_objective": objective.detach() / b, "kl": kl.detach(),
                   "kl_over_delta": (kl.detach() > self.kl_delta).float(), "valid_groups": valid.float() / b,
                   "round": torch.tensor(float(self.round_index()), device=loss.device)}
        return loss, metrics
