"""A group's rewards as in-group win rates (Pref-GRPO; Wang et al. 2025, "Pref-GRPO: Pairwise Preference
Reward-based GRPO for Stable Text-to-Image Reinforcement Learning", arXiv 2508.20751).

Group-relative advantages divide each reward's deviation from its group's mean by a standard deviation; when a
reward model scores a group's images nearly alike, tiny differences become full-size advantages (the paper's
"illusory advantage"), which the policy then games. Pref-GRPO compares every pair of a group's K images instead and
trains on each image's win rate: the share of the other K - 1 it beats, a tie counting half (CodeGoat24/Pref-GRPO,
``_pairwise_win_rate`` in ``fastvideo/rewards/unifiedreward_think.py``, where a pairwise judge decides each pair).
Here a pointwise reward model decides each pair by its two scores (``online.reward_as: win_rate``), which keeps the
ranking and drops the scale; each model's win rates are then combined as its scores would be.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def group_win_rates(scores: Tensor) -> Tensor:
    """(G, K) win rates of (G, K) scores, K >= 2: for each sample, (wins + ties / 2) / (K - 1) over the other K - 1
    samples of its group (a higher score wins)."""
    a, b = scores[:, :, None].double(), scores[:, None, :].double()
    outcome = (a > b).double() + 0.5 * (a == b).double()
    k = scores.shape[1]
    return ((outcome.sum(dim=2) - 0.5) / (k - 1)).to(scores.dtype)
