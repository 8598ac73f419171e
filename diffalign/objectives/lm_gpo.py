"""GPO on a causal LM (Zhang et al. 2024, "Beyond Bradley-Terry Models: A General Preference Model for Language
Model Alignment", arXiv 2410.02197, Sec. 5; the setting the paper was written for): SPPO's loop with each
completion's general preference score s(y beats pi_t | x) in place of its win-rate minus 1/2 (the core ``gpo``
loss), against pi_t.

The score against pi_t is the mean over the group of s(y beats y_j) (:func:`diffalign.losses.self_play.
preference_scores`). A scalar reward gives s(y beats y') = r(y) - r(y'), the Bradley-Terry case; a general
preference model (``online.reward=gpm:PATH``, :mod:`diffalign.rewards.general_preference`) gives each group's
skew-symmetric table s(i, j) from its preference embeddings, which can hold cyclic preferences no scalar
reward can. Each group's highest- and lowest-scored completions are trained, as SPPO's.
"""

from __future__ import annotations

from diffalign.losses.self_play import preference_scores
from diffalign.objectives.gpo import GPO
from diffalign.objectives.lm_online import LanguageModelSelfPlay, best_vs_worst


class LanguageModelGPO(LanguageModelSelfPlay):
    """Best and worst of each group by their preference scores against pi_t, with those scores."""

    paper = GPO.paper

    loss_names = ("gpo",)
    supplies = ("score_chosen", "score_rejected")
    reads_preference_tables = True

    def pairs(self, rewards, generator):
        scores = preference_scores(rewards)  # (G, K) rewards or (G, K, K) tables
        groups, items = best_vs_worst(scores)
        chosen = scores[groups[:, None], items]
        return groups, items, {"score_chosen": chosen[:, 0], "score_rejected": chosen[:, 1]}
