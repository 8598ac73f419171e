"""What the self-play loops share (SPPO, DNO, GPO, INPO, RSO, DRIFT; DDO too): rounds of the previous
iterate's own samples, pairs chosen from them by a rule, a pairwise core loss against the previous iterate.

Round t on the round driver (:mod:`diffalign.train.online`): pi_t, the policy as it was when the round
began (:mod:`diffalign.objectives.round_reference`), samples K images for each of the round's prompts
(``online.group_size``) and a reward scores them. The objective's rule turns each group into training
pairs, chosen first, with the per-pair inputs its loss needs (SPPO's win-rates, GPO's preference
scores); the pairs are scored like Diffusion-DPO's (:mod:`diffalign.objectives.offline`: both images noised
at one timestep and noise, the likelihood proxy of :mod:`diffalign.diffusion.likelihood`), with pi_t as the
reference, for ``online.steps_per_round`` optimiser steps; then pi_{t+1} is the policy and the next round
is sampled. Only the clean samples are kept (no trajectories): these losses never look at the sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning
from diffalign.losses.self_play import win_rates
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.offline import OfflineDenoisingObjective
from diffalign.objectives.round_reference import PreviousRoundReference

Tensor = torch.Tensor


def extreme_pairs(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(G,) groups and (G, 2) each group's highest- and lowest-rewarded sample (the first of equals): the pair
    SPPO's, DNO's and online iterative DPO's data builders take from K samples."""
    return torch.arange(len(rewards)), torch.stack([rewards.argmax(dim=1), rewards.argmin(dim=1)], dim=1)


def win_rate_pairs(rewards: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """SPPO's rule (Wu et al. 2024, Sec. 5): each group's best and worst sample with their win-rates against
    pi_t, the mean of sigma(r(y) - r(y_j)) over the group (:func:`~diffalign.losses.self_play.win_rates`)."""
    groups, items = extreme_pairs(rewards)
    won = win_rates(rewards).gather(1, items)
    return groups, items, {"win_chosen": won[:, 0], "win_rejected": won[:, 1]}


def large_margin_pairs(rewards: Tensor, min_gap: float) -> tuple[Tensor, Tensor]:
    """DNO's rule (Rosset et al. 2024, Algorithm 2): each group's best vs worst sample, kept when their rewards
    differ by at least ``min_gap``; with none kept, the widest pair alone (the first of equally wide ones)."""
    groups, items = extreme_pairs(rewards)
    gap = rewards.gather(1, items[:, :1]).squeeze(1) - rewards.gather(1, items[:, 1:]).squeeze(1)
    keep = gap >= min_gap
    if not keep.any():
        keep[gap.argmax()] = True
    return groups[keep], items[keep]


class SelfPlayObjective(PreviousRoundReference, OfflineDenoisingObjective, OnlineObjective):
    """Base of the self-play objectives; see the module docstring. A subclass says how a round's groups become
    pairs (:meth:`pairs`) and which per-pair inputs it estimates for its loss (``supplies``); ``loss_names``
    limits the losses to those that read them (None: any pairwise loss that needs no input)."""

    shadow_weights = True
    frozen_reference = False  # pi_t is the reference; no copy of the base is needed
    loss_kinds = ("pairwise",)
    group_size = 5  # SPPO's and DNO's K
    shared_noise = False
    takes_labels = False
    keeps_trajectories = False

    def pairs(self, round_) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The round's pairs: (N,) the group of each, (N, 2) its two samples chosen first, and (N,) inputs of
        the loss per pair."""
        raise NotImplementedError

    real_is_chosen = True  # real_data objectives: the data image is the pair's chosen one (DDO) or not (DRIFT)

    def training_units(self, round_) -> dict[str, Any]:
        if self.real_data:  # each data image with pi_t's one sample for its caption
            samples, real = round_.latents[:, 0, -1], round_.real.to(round_.latents.dtype)
            pair = [real, samples] if self.real_is_chosen else [samples, real]
            return {"latents": torch.stack(pair, dim=1), "prompt_of": torch.arange(len(round_.prompts)),
                    "targets": {}}
        groups, items, inputs = self.pairs(round_)
        clean = round_.latents[:, :, -1]  # (G, K, C, h, w): the final latents
        return {"latents": clean[groups[:, None], items], "prompt_of": groups, "targets": inputs,
                "logged": {"pairs_per_round": torch.tensor(float(len(groups)))}}

    def reference_for(self, reference: nn.Module | None) -> nn.Module | None:
        """The reference of the pairwise loss: pi_t (INPO's is the base, with pi_t as an input)."""
        return self.previous_round()

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **inputs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        loss, metrics = super().__call__(backbone, latents, cond, randomness, policy, self.reference_for(reference),
                                         **inputs)
        metrics["round"] = torch.tensor(float(self.round_index()), device=loss.device)
        return loss, metrics

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        return self.spec.fn(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=self.beta, **options)


def check_rewards(round_, method: str) -> Tensor:
    """The round's (G, K) rewards; a clear error when people label pairs instead (the rule needs K scores)."""
    if round_.rewards is None:
        raise ValueError(f"{method} builds its pairs from a reward of every sample: set online.reward")
    return round_.rewards
