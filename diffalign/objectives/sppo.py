"""SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675)
on the round driver: each round pi_t samples K images per prompt, a reward scores them, and every sample's
win-rate against pi_t is estimated from the group; the highest- and lowest-scored samples of each prompt
are trained with the core ``sppo`` loss (Eq. 4.7), log pi_{t+1} / pi_t regressed on eta (P - 1/2).

The win-rate P(y beats pi_t | x) is the mean over the group of sigma(r(y) - r(y_j))
(:func:`diffalign.losses.self_play.win_rates`, as the authors' compute_prob.py does with PairRM's scores):
a Bradley-Terry reading of the reward, so its scale matters, as PairRM's did. The authors' K is 5 and
beta (1 / eta) 0.001 on summed token log-probabilities; a diffusion model's log-ratio is a per-element
mean of denoising errors (:mod:`diffalign.diffusion.likelihood`), so beta is set per backbone (the recipes
say how). ``objective.loss`` may also be ``sppo_hard`` (P taken as 1 and 0).
"""

from __future__ import annotations

from diffalign.objectives.self_play import SelfPlayObjective, check_rewards, win_rate_pairs


class SPPO(SelfPlayObjective):
    """Best and worst of each group with their estimated win-rates against pi_t."""

    paper = "Wu et al. 2024, arXiv 2405.00675"

    loss_names = ("sppo", "sppo_hard")
    supplies = ("win_chosen", "win_rejected")

    def pairs(self, round_):
        groups, items, inputs = win_rate_pairs(check_rewards(round_, "sppo"))
        return groups, items, inputs if self.spec.inputs else {}
