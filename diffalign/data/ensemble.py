"""A reward-model ensemble's verdict on each labelled pair: the preference strength of "Secrets of RLHF in
Large Language Models Part II: Reward Modeling" (Wang et al. 2024, arXiv 2401.06080, Section 3).

Each of M reward models scores both images of a pair; its preference strength is the score of the image
the label calls the winner minus the other's, d_m. Their mean and standard deviation over the models,

    u = (1/M) sum_m d_m,        sigma = sqrt((1/M) sum_m (d_m - u)^2),

say how strongly, and how unanimously, the ensemble backs the label. The paper finds the pairs of lowest
mean strength mostly mislabelled (and the ones near zero ambiguous); UPO and others drop or down-weight
pairs the ensemble disputes (or soften their labels, :func:`softened_preference`). The vote share, the fraction of models whose d_m backs the label (a model
with d_m = 0 counting half), is the paper's voting view of the same numbers and serves as a pair weight. Reward models on different scales (PickScore, HPS, an aesthetic score) are put
on one by dividing each model's differences by their standard deviation over the dataset before averaging
(the paper's M models share one scale; this is the same when they do).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _strengths(first: Tensor, second: Tensor, first_wins: Tensor) -> Tensor:
    """(N, M) each model's strength for the labelled winner, each model's gaps divided by their spread."""
    difference = first - second
    spread = difference.std(dim=0, correction=0)
    difference = difference / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(first_wins[:, None], difference, -difference)


def vote_share(first: Tensor, second: Tensor, first_wins: Tensor) -> Tensor:
    """(N,) the fraction of the M models that back each pair's labelled winner, a model at d_m = 0 counting half."""
    strength = _strengths(first, second, first_wins)
    return ((strength > 0).double() + 0.5 * (strength == 0).double()).mean(dim=1).to(first.dtype)


def preference_strength(first: Tensor, second: Tensor, first_wins: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) mean and (N,) standard deviation over M models of each pair's strength for its labelled winner.

    Args:
        first, second: (N, M) scores of each pair's first and second image by M reward models.
        first_wins: (N,) bool, the label's verdict.
    """
    strength = _strengths(first, second, first_wins)
    return strength.mean(dim=1), strength.std(dim=1, correction=0)


def softened_preference(first: Tensor, second: Tensor, first_wins: Tensor) -> Tensor:
    """(N,) the ensemble's probability that each pair's labelled winner is the better image: the mean over the M
    models of sigma(d_m), d_m each model's strength on the common scale above.

    ``data.ensemble=soften`` trains soft-label losses on it (diffalign's way of softening the disputed pairs the paper
    points at: a unanimous, strong verdict stays near 1, a split one near 1/2, one the ensemble disputes below it).
    """
    return torch.sigmoid(_strengths(first, second, first_wins)).mean(dim=1)
