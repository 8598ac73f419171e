"""SPPO on a causal LM (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 and Sec. 5, the setting the paper was
written for): each round pi_t samples K = 5 completions per prompt, each one's win-rate against pi_t is
estimated from the group's rewards, and the best and worst train the ``sppo`` loss against pi_t."""

from __future__ import annotations

from diffalign.objectives.lm_online import LanguageModelSelfPlay
from diffalign.objectives.self_play import win_rate_pairs


class LanguageModelSPPO(LanguageModelSelfPlay):
    """Best and worst of each group with their estimated win-rates against pi_t."""

    paper = "Wu et al. 2024, arXiv 2405.00675"

    loss_names = ("sppo", "sppo_hard")
    supplies = ("win_chosen", "win_rejected")

    def pairs(self, rewards, generator):
        groups, items, inputs = win_rate_pairs(rewards)
        return groups, items, inputs if self.spec.inputs else {}
