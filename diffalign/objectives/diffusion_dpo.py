"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), through any pairwise core loss.

Paper, Eq. 14: with x^w, x^l noised at one shared t and eps,

    L = -log sigma( -beta T w(lambda_t) [ ||eps - eps_theta(x^w_t)||^2 - ||eps - eps_ref(x^w_t)||^2
                                      - (||eps - eps_theta(x^l_t)||^2 - ||eps - eps_ref(x^l_t)||^2) ] )

With the score s(x) = -w(t) * mean squared error (:mod:`diffalign.diffusion.likelihood`)
this is exactly ``losses.dpo(s_theta(x^w), s_theta(x^l), s_ref(x^w), s_ref(x^l), beta)``;
any other pairwise loss (ipo, hinge, robust, ...) or soft-label loss is one config key away.
Unpaired losses (kto, bco, npo) read each pair as one desirable and one undesirable image, as
KTO's paper does with preference pairs; a pair's loss is the mean of its images' losses, so
the batch mean equals the unpaired loss's own mean over the images it scores (NPO scores only the
undesirable ones unless its retain term is on). KTO's reference point and BCO's running reward
shift come from the whole batch's rewards (see ``OfflineDenoisingObjective.loss_options``).

Constants: the official code computes ``-0.5 * beta * (model_diff - ref_diff)`` with
beta = 5000 (SD1.5); diffusers' port computes ``beta * (ref_diff - model_diff)`` with 2500.
Both equal ``dpo`` here with beta = 2500 (the 0.5 is folded in); errors are per-pixel means.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.objectives.offline import OfflineDenoisingObjective

Tensor = torch.Tensor


class DiffusionDPO(OfflineDenoisingObjective):
    """Offline pairwise objective on (winner, loser) latents sharing timestep and noise."""

    paper = "Wallace et al. 2023, arXiv 2311.12908"

    dataset = "pairs"
    loss_kinds = ("pairwise", "soft-label", "reference-free", "regulariser", "unpaired")

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        rc, rr = (None, None) if reference is None else (reference[:, 0], reference[:, 1])
        if self.spec.kind == "soft-label":
            certain = torch.ones_like(policy[:, 0])
            options = {**options, "preference": preference if preference is not None else certain}
        loss = self.spec.fn(policy[:, 0], policy[:, 1], rc, rr, beta=self.beta, **options)
        if self.spec.kind == "unpaired":  # (desirable losses, then undesirable ones) -> one per pair
            return loss.view(-1, len(policy)).mean(0)  # NPO without its retain term has undesirable ones only
        return loss
