"""Combining several reward models' scores (RankDPO's Syn-Pic: ranks averaged over reward models).

Reward models disagree in scale (PickScore ~20, HPS ~0.3, aesthetic ~6), so each model's
scores are first normalised among the images of the same prompt, then averaged:

- ``zscore``: (s - mean) / std over the prompt's images (0 where they all score the same);
- ``rank``:   the image's rank among the prompt's images, scaled to [0, 1] (1 = best; ties share
  the mean of their ranks).
"""

from __future__ import annotations

from typing import Mapping

import torch

Tensor = torch.Tensor

METHODS = ("zscore", "rank")


def normalise_per_prompt(scores: Tensor, groups: Tensor, method: str = "zscore") -> Tensor:
    """(N,) scores normalised within each group of images sharing a prompt (``groups``: (N,) group ids)."""
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; choose {' or '.join(METHODS)}")
    scores = scores.double()
    out = torch.zeros_like(scores)
    for g in groups.unique():
        members = groups == g
        s = scores[members]
        if method == "zscore":
            std = s.std(unbiased=False)
            out[members] = (s - s.mean()) / std if std > 0 else torch.zeros_like(s)
        else:
            below = (s[None, :] < s[:, None]).sum(dim=1).double()
            ties = (s[None, :] == s[:, None]).sum(dim=1).double()
            rank = below + (ties - 1) / 2  # 0-based, ties share their mean rank
            out[members] = rank / (len(s) - 1) if len(s) > 1 else torch.full_like(s, 0.5)
    return out


def ensemble(scores: Mapping[str, Tensor], groups: Tensor, method: str = "zscore") -> Tensor:
    """(N,) mean over reward models of their per-prompt normalised scores."""
    return torch.stack([normalise_per_prompt(s, groups, method) for s in scores.values()]).mean(dim=0)
