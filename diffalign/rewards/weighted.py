"""Several reward models as one training reward for online rounds: a weighted sum of normalised rewards.

Reward models disagree in scale (PickScore ~20, HPS ~0.3, JPEG size in kB), so a raw sum would let the
largest-scaled model decide. With more than one model each model's scores are first normalised among the
round's samples of the same prompt (:func:`~diffalign.rewards.ensemble.normalise_per_prompt`, z-scores),
then summed with their weights:

    r_i = sum_m w_m (s_m,i - mean_m(prompt of i)) / std_m(prompt of i).

This is DanceGRPO's multi-reward advantage (each reward's group-normalised advantage, weighted and
summed); Flow-GRPO's ``MultiScorer`` sums raw scores instead, which the per-prompt normalisation of the
group objectives then rescales only as a whole. One model alone is used as it scores (raw), so a
single-reward run is unchanged. Every model's raw score is kept and logged beside the combined one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.rewards.ensemble import normalise_per_prompt

Tensor = torch.Tensor


def reward_specs(reward: str | dict | list | None) -> list:
    """The reward model specs of ``online.reward``: none, one, or a list of them."""
    return [] if reward is None else reward if isinstance(reward, list) else [reward]


def reward_names(reward: str | dict | list | None) -> list[str]:
    """The names of the reward models of ``online.reward`` (none, one, or a list)."""
    from diffalign.rewards import RewardSpec

    return [RewardSpec.parse(spec).name for spec in reward_specs(reward)]


def parse_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """The weight of each of ``count`` reward models: as given (one per model, finite), or 1 each."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise UserError(f"online.reward_weights={list(weights)} must be {count} finite numbers, one per reward "
                        "model of online.reward")
    return [float(w) for w in weights]


def combine_rewards(parts: dict[str, Tensor], weights: Sequence[float], prompts: Sequence[str]) -> Tensor:
    """(N,) training reward of N samples from each model's raw (N,) scores (``parts``, in the weights' order) and
    each sample's prompt: the raw scores of a single model, else the weighted sum of per-prompt z-scores."""
    if len(parts) == 1:
        return next(iter(parts.values())).float()
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    groups = torch.tensor([index[p] for p in prompts])
    total = sum(w * normalise_per_prompt(s, groups) for w, s in zip(weights, parts.values()))
    return total.float()


def weighted_raw_mean(parts: dict[str, Tensor], weights: Sequence[float]) -> Tensor:
    """The weighted sum of each model's mean raw score: one number that rises as the policy gets each model's
    approval, logged as ``train_reward`` (the combined reward is centred per prompt, so its mean says nothing)."""
    return sum(w * s.float().mean() for w, s in zip(weights, parts.values()))
