"""INPO, Iterative Nash Policy Optimization (Zhang et al. 2024, "Aligning LLMs with General Preferences via
No-Regret Learning", arXiv 2407.00617) on the round driver; named ``inpo_nash`` apart from the diffusion
``inpo`` (DDIM-inversion DPO), another paper.

Each round pi_t samples K images per prompt and a reward (the preference oracle) scores them; each prompt's
best and worst sample form a pair, as online iterative DPO builds them. The core ``inpo_nash`` loss is IPO's
square loss with a geometric mix of two references, the base model with weight ``ratio`` = tau eta and pi_t
with 1 - ratio: its minimiser is the no-regret (online mirror descent) step on the preference game, so no
win-rate is estimated. The base is scored as every reference is (the LoRA-disabled denoiser, or the frozen
copy of a full fine-tune), pi_t from the round's snapshot, both on the pair's noised latents.
"""

from __future__ import annotations

import torch
from torch import nn

from diffalign.diffusion import Backbone, NoisedGroup
from diffalign.diffusion.likelihood import denoising_scores
from diffalign.objectives.self_play import SelfPlayObjective, check_rewards, extreme_pairs

Tensor = torch.Tensor


class INPONash(SelfPlayObjective):
    """Best vs worst of each group; the base is the reference and pi_t an input of the loss."""

    paper = "Zhang et al. 2024, arXiv 2407.00617"

    frozen_reference = True  # the base model is the loss's reference
    loss_names = ("inpo_nash",)
    supplies = ("previous_chosen", "previous_rejected")

    def pairs(self, round_):
        groups, items = extreme_pairs(check_rewards(round_, "inpo_nash"))
        return groups, items, {}

    def reference_for(self, reference: nn.Module | None) -> nn.Module | None:
        return reference  # the base (None: the LoRA-disabled denoiser)

    def scored_inputs(self, backbone: Backbone, group: NoisedGroup) -> dict[str, Tensor]:
        """pi_t's scores of the pair, on the same noised latents as the policy's and the base's."""
        with torch.no_grad():
            previous = denoising_scores(backbone, group, denoiser=self.previous_round())
        return {"previous_chosen": previous[:, 0], "previous_rejected": previous[:, 1]}
