"""Smoothed preferences from reward-model scores (SmPO-Diffusion, Lu et al. 2025).

A hard label says which image won, not by how much. SmPO's preprocessing scores both images
of a pair with a reward model, min-max normalises the scores over the dataset and takes the
Bradley-Terry probability that the first image is preferred:

    p_m = exp(s'_1) / (exp(s'_1) + exp(s'_2)) = sigma((s_1 - s_2) / (max_m - min_m))

With several reward models the probabilities are averaged (preference-probability averaging),
so p is the mean of the p_m. p = 0.5 is a tie, and p near 1 is a clear win.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def score_ranges(first: Tensor, second: Tensor) -> Tensor:
    """(M,) max - min of each reward model's scores over both images of every pair.

    Args:
        first, second: (N, M) scores of the pairs' first and second images by M reward models.
    """
    both = torch.cat([first, second])
    spread = both.amax(dim=0) - both.amin(dim=0)
    return torch.where(spread > 0, spread, torch.ones_like(spread))  # a constant model says nothing


def smoothed_preference(first: Tensor, second: Tensor, scales: Tensor | None = None) -> Tensor:
    """(N,) P(first image preferred), averaged over the M reward models.

    Args:
        first, second: (N, M) scores of each pair's first and second image.
        scales: (M,) score scale per model; by default its range over these pairs (the authors'
            min-max normalisation).
    """
    scales = score_ranges(first, second) if scales is None else scales
    return torch.sigmoid((first - second) / scales).mean(dim=1)
