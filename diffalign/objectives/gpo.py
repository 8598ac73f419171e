"""GPO (Zhang et al. 2024, "Beyond Bradley-Terry Models: A General Preference Model for Language Model
Alignment", arXiv 2410.02197, Sec. 5) on the round driver: SPPO's loop with the general preference score
s(y beats pi_t | x) in place of the win-rate minus 1/2 (the core ``gpo`` loss).

Each round pi_t samples K images per prompt and a reward scores them; the score of each sample against
pi_t is the mean over the group of s(y beats y_j) (:func:`diffalign.losses.self_play.preference_scores`).
From a scalar reward s(y beats y') = r(y) - r(y'), the Bradley-Terry special case of the general
preference model; the authors' skew-symmetric preference embeddings (which capture cyclic preferences)
would give the (G, K, K) table that function also takes, but no reward here returns one yet. The
highest- and lowest-scored samples of each prompt are trained, as SPPO's.
"""

from __future__ import annotations

from diffalign.losses.self_play import preference_scores
from diffalign.objectives.self_play import SelfPlayObjective, check_rewards, extreme_pairs


class GPO(SelfPlayObjective):
    """Best and worst of each group with their preference scores against pi_t."""

    paper = "Zhang et al. 2024, arXiv 2410.02197"

    loss_names = ("gpo",)
    supplies = ("score_chosen", "score_rejected")

    def pairs(self, round_):
        rewards = check_rewards(round_, "gpo")
        groups, items = extreme_pairs(rewards)
        score = preference_scores(rewards).gather(1, items)
        return groups, items, {"score_chosen": score[:, 0], "score_rejected": score[:, 1]}
