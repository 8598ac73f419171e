"""SparsePO on a diffusion model: Diffusion-DPO with each latent location's share of the margin under a learned mask.

The denoising score of an image splits over its latent locations (:func:`diffalign.diffusion.location_scores`), as
a completion's log-prob splits over its tokens. ``u = sum_hw m_w,hw r_w,hw - sum_hw m_l,hw r_l,hw`` with ``r`` the
policy's minus the reference's location score is the masked Diffusion-DPO margin, and the loss is the core loss
``sparse_po`` (:mod:`diffalign.losses.token_level`) with no KL term (a denoiser has no per-location distribution to
hold, so ``d = 0``): with every mask 1 it is Diffusion-DPO exactly. The masks come from
:class:`diffalign.diffusion.region_masks.RegionMaskModel` on the noised latents and the reference's predictions and
train with the policy (the trainer adds the mask model to the denoiser, so it is optimised, synchronised and
checkpointed with it, and left out of the final weights). ``loss_options.l1_reward`` pushes the masks sparse;
``mask_width`` is the mask model's width (32).

The Diffusion-DPO line of work masks regions by hand (an inpainting region); this objective learns the mask, as
SparsePO does for tokens. It is diffalign's extension of SparsePO to latents, not a published method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffalign import losses
from diffalign.config import ranged
from diffalign.diffusion import Backbone, Conditioning, location_scores, reference_denoiser
from diffalign.diffusion.region_masks import RegionMaskModel
from diffalign.errors import UserError
from diffalign.objectives.offline import OfflineDenoisingObjective

Tensor = torch.Tensor


@dataclass
class RegionMaskOptions:
    # channels of the region mask model's hidden layer
    mask_width: int = ranged(32, "[1, inf)")


class DiffusionSparsePO(OfflineDenoisingObjective):
    """Masked Diffusion-DPO on (winner, loser) latents; see the module docstring."""

    paper = "Christopoulou et al. 2024, arXiv 2410.05102 (on latents: diffalign's extension)"

    dataset = "pairs"
    loss_kinds = ("token-level",)
    Options = RegionMaskOptions

    @classmethod
    def check_config(cls, config) -> None:
        if config.objective.loss_options.get("l1_kl"):
            raise UserError("diffusion_sparse_po has no KL term (d = 0), so objective.loss_options.l1_kl does nothing; "
                            "remove it")

    def __init__(self, config, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.width = self.options_of(config).mask_width
        self.channels = backbone.latent_channels
        self.masks: RegionMaskModel | None = None

    def trained_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        self.masks = RegionMaskModel(self.channels, self.width)
        return {"sparse_po_region_masks": self.masks}

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, weight: Tensor | None = None,
                 **targets: Any) -> tuple[Tensor, dict[str, Any]]:
        """Mean masked loss over the pairs (each times its weight) and detached metrics; ``latents`` (B, 2, C, h, w),
        winner first."""
        group = self.noise(backbone, latents, cond, randomness)
        policy_scores, _ = location_scores(backbone, group, denoiser=policy)
        with torch.no_grad(), reference_denoiser(backbone.denoiser, reference) as frozen:
            ref_scores, ref_prediction = location_scores(backbone, group, denoiser=frozen)
        masks = self.masks(group.noisy.float(), ref_prediction.float()).view(group.groups, 2, -1)
        r = (policy_scores - ref_scores).view(group.groups, 2, -1)
        ones, zeros = torch.ones_like(r[:, 0]), torch.zeros_like(r[:, 0])
        per_pair = self.spec.fn(r[:, 0], r[:, 1], zeros, zeros, beta=self.beta, chosen_mask=ones, rejected_mask=ones,
                                chosen_reward_mask=masks[:, 0], rejected_reward_mask=masks[:, 1],
                                chosen_kl_mask=zeros, rejected_kl_mask=zeros, **self.options)
        if weight is not None:
            per_pair = per_pair * weight
        with torch.no_grad():  # the unmasked scores: Diffusion-DPO's own metrics, then the masks'
            s, ref = policy_scores.view(group.groups, 2, -1).sum(-1), ref_scores.view(group.groups, 2, -1).sum(-1)
            metrics = {"raw_model_loss": -s.mean(), "ref_loss": -ref.mean(),
                       **losses.preference_metrics(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], beta=self.beta),
                       "mask/region_mean": masks.mean(), "mask/region_zero_share": (masks == 0).float().mean()}
        return per_pair.mean(), metrics
