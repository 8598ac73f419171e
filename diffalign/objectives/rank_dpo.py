"""RankDPO (Karthik et al. 2024, "Scalable Ranked Preference Optimization for Text-to-Image
Generation", arXiv 2410.18013), through any listwise core loss (default ``lambda_dpo``).

Each prompt comes with a ranked list of K images (Syn-Pic: images from several generators,
ranked by the average of several reward models). All K share one timestep and one noise, and
each gets the Diffusion-DPO implicit reward (Eq. 4)

    r_k = -(||eps - eps_theta(x^k_t)||^2 - ||eps - eps_ref(x^k_t)||^2) = s_theta(x^k) - s_ref(x^k).

The loss (Eq. 5-7) is a DPO loss over every pair (i better than j) of the list, each weighted
by LambdaRank's |Delta DCG_ij| = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, with gains G from the
list's scores and ranks tau from the model's current implicit rewards:

    L = sum_{i > j} |Delta DCG_ij| * -log sigma(beta (r_i - r_j)).

That is ``losses.lambda_dpo``; plackett_luce, tpo or adpo are one config key away. beta
follows Diffusion-DPO (the paper builds on it; 2500 here equals its 5000 with the 0.5 folded in).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.objectives.offline import OfflineDenoisingObjective

Tensor = torch.Tensor


class RankDPO(OfflineDenoisingObjective):
    """Offline listwise objective on ranked lists of K latents sharing timestep and noise."""

    paper = "Karthik et al. 2024, arXiv 2410.18013"

    dataset = "ranked"
    loss_kinds = ("listwise",)

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        return self.spec.fn(policy, reference, beta=self.beta, scores=scores, **options)
