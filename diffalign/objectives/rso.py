"""RSO, statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
Optimization", arXiv 2309.06657, Algorithm 1) on the round driver.

DPO's data should come from the optimal policy pi*(y | x) ∝ pi(y | x) exp(r(x, y) / beta), not from the
sampling policy. RSO draws from pi* by rejection: of a prompt's K candidates from pi, while fewer than
``objective.options.accepted`` are accepted, each remaining candidate is accepted with probability
exp((r - r_max) / beta), r_max the best reward still in the pool, and leaves it (the paper's code). The
accepted samples are paired in the order they were accepted and each pair is labelled by the reward (the
paper's "rso-sample-rank"); pairs of equal reward are dropped. A pairwise loss trains them (the paper's
sigmoid-norm is ``dpo``, its hinge-norm ``hinge``).

On the round driver the proposal pi and the loss's reference are pi_t, the policy at the round's start, so
round 0 is the paper's RSO from the base and later rounds repeat it from the improved policy. beta is in the
reward's units (``objective.options.rejection_beta``); the acceptance draws come from each group's own generator, so a
round's pairs are a pure function of the run's seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from diffalign.errors import UserError
from diffalign.objectives.self_play import SelfPlayObjective, check_rewards
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


def rejection_sample(rewards: Tensor, *, beta: float, accepted: int, generator: torch.Generator) -> list[int]:
    """Indices of ``accepted`` of a group's candidates (``rewards`` (K,)), in the order Algorithm 1 accepts them."""
    pool = list(range(len(rewards)))
    chosen: list[int] = []
    while len(chosen) < accepted:
        best = max(float(rewards[i]) for i in pool)
        for i in list(pool):
            if float(torch.rand((), generator=generator)) < torch.exp((rewards[i] - best) / beta):
                chosen.append(i)
                pool.remove(i)
                if len(chosen) == accepted:
                    break
    return chosen


def rejection_pairs(rewards: Tensor, *, beta: float, accepted: int,
                    generator: Callable[[int], torch.Generator]) -> tuple[Tensor, Tensor]:
    """(N,) groups and (N, 2) pairs, the better first: each group's (row of ``rewards`` (G, K)) accepted candidates
    paired in acceptance order ("rso-sample-rank"), pairs of equal reward dropped. ``generator(g)``: group g's own
    generator for the acceptance draws. The diffusion and LM loops share this rule."""
    groups, items = [], []
    for g, scores in enumerate(rewards):
        order = rejection_sample(scores, beta=beta, accepted=accepted, generator=generator(g))
        for a, b in zip(order[0::2], order[1::2]):
            if scores[a] != scores[b]:
                groups.append(g)
                items.append([a, b] if scores[a] > scores[b] else [b, a])
    if not items:
        raise ValueError("rso: every accepted pair of the round has equal rewards; nothing to train on")
    return torch.tensor(groups), torch.tensor(items)


@dataclass
class RSOOptions:
    # Algorithm 1's beta, in the reward's units: each candidate is accepted with probability exp((r - r_max) / beta)
    rejection_beta: float = ranged(0.5, "(0, inf)")
    # how many of a prompt's candidates it accepts (paired in acceptance order); at most the group's size
    accepted: int = ranged(4, "[2, inf)")


def check_accepted(cls, config) -> None:
    """``objective.options.accepted`` is at most the round's group size."""
    accepted = cls.options_of(config.objective).accepted
    k = cls.round_group_size(config)
    if accepted > k:
        raise UserError(f"{config.objective.name}: objective.options.accepted={accepted} is more than the group's {k} "
                        "candidates (online.group_size)")


class RejectionSampled:
    """Mixin of the RSO loops (images here, completions in :mod:`diffalign.objectives.lm_rso`): reads RSO's options
    once, checks ``accepted`` against the group size, and pairs a round's (G, K) rewards by Algorithm 1."""

    def __init__(self, config: ObjectiveConfig, model=None) -> None:
        super().__init__(config, model)
        options = self.options_of(config)
        self.rso_beta, self.accepted = options.rejection_beta, options.accepted

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_accepted(cls, config)

    def rejection_pairs(self, rewards: Tensor, generator: Callable[[int], torch.Generator]) -> tuple[Tensor, Tensor, dict]:
        return (*rejection_pairs(rewards, beta=self.rso_beta, accepted=self.accepted, generator=generator), {})


class RSO(RejectionSampled, SelfPlayObjective):
    """Pairs of rejection-sampled candidates, the better first."""

    paper = "Liu et al. 2023, arXiv 2309.06657"

    Options = RSOOptions

    def pairs(self, round_):
        return self.rejection_pairs(check_rewards(round_, "rso"), round_.generator)
