"""Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
arXiv 2404.04465): per-image binary feedback (liked or not) instead of preference pairs.

Each captioned image is noised at its own random (t, noise) and scored with the denoising
likelihood proxy, r = s_theta(x) - s_ref(x) with s = -w(t) * mean squared error. KTO's value
function (Ethayarajh et al. 2024, Eq. 8) then applies per image:

    desirable:    lambda_D * (1 - sigma(beta * (r - z_0)))
    undesirable:  lambda_U * (1 - sigma(beta * (z_0 - r)))

with the reference point z_0 = max(0, mean r over the batch), detached: the ``kto`` core loss with
that estimate passed as its ``kl``. The authors' code (``train_kto_sd_v1.5.py`` with its defaults
``--halo sigmoid --bce_offset none``) computes the same, with beta = 1000 (``--beta_dpo``) and
lambda_D = lambda_U = 1. As there, the batch mean in z_0 is averaged over the processes (the
global batch), and ``data.positive_ratio`` draws liked images with a set probability, their
``--positive_ratio`` (0.8 in their example; the data's own mix by default here). Other unpaired core
losses (bco, with its running reward shift; npo) are one config key away.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.objectives.offline import OfflineDenoisingObjective

Tensor = torch.Tensor


class DiffusionKTO(OfflineDenoisingObjective):
    """Offline objective on single captioned images with binary labels (``data.label_column``)."""

    paper = "Li et al. 2024, arXiv 2404.04465"

    dataset = "labelled_images"
    loss_kinds = ("unpaired",)

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        """(B,) loss of the images, in batch order, from the unpaired loss's (liked, then not liked) losses."""
        liked = preference > 0.5

        def split(scores: Tensor | None) -> list[Tensor | None]:  # an empty side is None for the core loss
            parts = [None, None] if scores is None else [scores[:, 0][liked], scores[:, 0][~liked]]
            return [part if part is not None and len(part) else None for part in parts]

        (pc, pr), (rc, rr) = split(policy), split(reference)
        loss = self.spec.fn(pc, pr, rc, rr, beta=self.beta, **options)
        per_image = policy.new_zeros(len(policy), dtype=loss.dtype)
        if len(loss) == len(policy):
            per_image[liked], per_image[~liked] = loss[: int(liked.sum())], loss[int(liked.sum()):]
        else:  # NPO without its retain term scores the undesirable images only
            per_image[~liked] = loss
        return per_image

    def reward_metrics(self, policy: Tensor, reference: Tensor, *, preference: Tensor | None,
                       options: dict[str, Any]) -> dict[str, Tensor]:
        """Mean implicit reward of the liked and of the other images, and the fraction of images whose
        reward lies on their label's side of the batch's reference point (the authors' logged accuracy; an
        image exactly at the reference point counts one half, as a tie in every pairwise objective)."""
        r = (policy - reference)[:, 0].float()
        liked = (preference > 0.5).float()
        z0 = options["kl"] if "kl" in options else self.reference_point(policy, reference)  # the kto loss's one
        agree = torch.where(liked.bool(), r > z0, r < z0).float() + 0.5 * (r == z0).float()
        return {
            "rewards/desirable": self.beta * (r * liked).sum() / liked.sum().clamp(min=1.0),
            "rewards/undesirable": self.beta * (r * (1 - liked)).sum() / (1 - liked).sum().clamp(min=1.0),
            "implicit_acc": agree.mean(),
        }
