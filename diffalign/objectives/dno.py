"""DNO (Rosset et al. 2024, "Direct Nash Optimization: Teaching Language Models to Self-Improve with General
Preferences", arXiv 2404.03715, Algorithm 2, DNO-Prct) on the round driver.

Each round pi_t samples K images per prompt and a reward (the preference oracle) scores them; each prompt
gives its best and worst sample as a pair, kept only when their rewards differ by at least
``objective.options.min_reward_gap`` (the algorithm's large-margin filter: a narrow pair's label is noise), and the
kept pairs train a contrastive pairwise loss (``objective.loss``, DPO by default) against pi_t, the previous
iterate, as the reference. When no pair of a round clears the gap, the round trains on its widest pair
alone and the log's ``pairs_per_round`` shows 1. The paper also mixes a teacher's outputs (GPT-4) into the
K candidates; here the candidates are the policy's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffalign.objectives.self_play import SelfPlayObjective, check_rewards, large_margin_pairs
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.diffusion import Backbone
    from diffalign.config import ObjectiveConfig


@dataclass
class DNOOptions:
    # a prompt's best-vs-worst pair is trained only when their rewards differ by at least this much (DNO's
    # large-margin filter; in the reward's units)
    min_reward_gap: float = ranged(0.0, "[0, inf)")


class DNO(SelfPlayObjective):
    """Best vs worst of each group, when their rewards differ by at least ``objective.options.min_reward_gap``."""

    paper = "Rosset et al. 2024, arXiv 2404.03715"

    Options = DNOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.min_gap = self.options_of(config).min_reward_gap

    def pairs(self, round_):
        return (*large_margin_pairs(check_rewards(round_, "dno"), self.min_gap), {})
