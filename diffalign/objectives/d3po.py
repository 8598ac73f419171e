"""D3PO (Yang et al. 2023, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model", arXiv 2311.13231): DPO on the denoising MDP, through any pairwise core loss.

Two trajectories of one prompt start from the same noise; a person or a reward function says
which final image is better. Each denoising step is an action with the Gaussian policy
p_theta(x_{k+1} | x_k, c) (:mod:`diffalign.diffusion.logprob`), and the DPO loss is applied per
step k (Eq. 9, with the authors' clipping of the probability ratio to [1 - eps, 1 + eps]):

    L_k = -log sigma( beta * [ clip(log p_theta(w_k) - log p_ref(w_k))
                               - clip(log p_theta(l_k) - log p_ref(l_k)) ] )

Defaults follow the official config: beta 0.1, eps 0.1, 20 DDIM steps with eta 1.0, guidance 5.0
in sampling and training, every step trained. With the clipped log-ratios passed in place of
the policy terms, the core ``dpo`` loss is exactly this; other pairwise losses apply the same way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffalign import losses
from diffalign.diffusion import Backbone, Conditioning, reference_denoiser
from diffalign.diffusion.logprob import step_log_prob
from diffalign.objectives.base import OnlineObjective
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


def clipped_log_ratio(policy: Tensor, reference: Tensor, eps: float) -> Tensor:
    """log(p_theta / p_ref) clipped to [log(1 - eps), log(1 + eps)] (the authors' ratio clipping)."""
    return (policy - reference).clamp(math.log(1 - eps), math.log(1 + eps))


def d3po_step_loss(policy_w: Tensor, policy_l: Tensor, reference_w: Tensor, reference_l: Tensor, *,
                   beta: float = 0.1, eps: float = 0.1, loss: str = "dpo", **loss_options) -> Tensor:
    """(B,) loss of one denoising step of B trajectory pairs, from per-step log-probabilities."""
    spec = losses.spec(loss)
    if spec.kind != "pairwise":
        raise ValueError(f"d3po takes a pairwise loss; {loss!r} is {spec.kind}")
    chosen = reference_w + clipped_log_ratio(policy_w, reference_w, eps)
    rejected = reference_l + clipped_log_ratio(policy_l, reference_l, eps)
    return spec.fn(chosen, rejected, reference_w, reference_l, beta=beta, **loss_options)


@dataclass
class D3POOptions:
    # p_theta / p_ref is clipped to [1 - ratio_clip, 1 + ratio_clip] (the authors' clip range)
    ratio_clip: float = ranged(0.1, "(0, 1)")


class D3PO(OnlineObjective):
    """The online objective: per-step D3PO loss on recorded trajectory pairs (winner first).

    Called like the offline objectives with ``latents`` (B, 2, T + 1, C, h, w) trajectory pairs
    and ``randomness["step"]`` (B,) the denoising step trained for each pair; the rounds that
    produce them live in :mod:`diffalign.train.online`. T must be ``objective.sample_steps``.
    """

    paper = "Yang et al. 2023, arXiv 2311.13231"

    loss_kinds = ("pairwise",)
    group_size = 2  # a round's pairs share their starting noise (the base's default)
    group_size_fixed = True

    Options = D3POOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.spec = losses.spec(config.loss)
        if self.spec.kind not in self.loss_kinds:
            raise ValueError(f"D3PO takes a pairwise loss; {config.loss!r} is {self.spec.kind}")
        self.beta, self.options = config.beta, dict(config.loss_options)
        self.eps = self.options_of(config).ratio_clip
        self.record_sampler(config, backbone)

    def training_units(self, round_) -> dict:
        """Each pair, winner first (by the reward, or by the human labels)."""
        winners = round_.winners()
        order = torch.stack([winners, 1 - winners], dim=1)
        g = len(round_.prompts)
        return {"latents": round_.latents[torch.arange(g)[:, None], order], "prompt_of": torch.arange(g),
                "targets": {}}

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b = latents.shape[0]
        trajectories = latents.flatten(0, 1)
        step = randomness["step"].repeat_interleave(2)
        cond = cond.repeat_items(2)
        sampler = self.sampler_settings(2 * b, latents.device)
        score = lambda net: step_log_prob(backbone, trajectories, step, cond, denoiser=net, **sampler)  # noqa: E731
        logp = score(policy).view(b, 2)
        with torch.no_grad(), reference_denoiser(backbone.denoiser, reference) as frozen:
            ref = score(frozen).view(b, 2)
        per_pair = d3po_step_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=self.beta, eps=self.eps,
                                  loss=self.spec.name, **self.options)
        # the implicit rewards beta * log pi/pi_ref of the step, named and tie-counted as every pairwise objective's
        return per_pair.mean(), losses.preference_metrics(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=self.beta)
