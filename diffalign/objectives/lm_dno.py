"""DNO on a causal LM (Rosset et al. 2024, arXiv 2404.03715, Algorithm 2, DNO-Prct): each round pi_t samples
K completions per prompt; the best and worst make a pair when their rewards differ by at least
``objective.min_reward_gap``, trained with a contrastive pairwise loss (DPO by default) against pi_t."""

from __future__ import annotations

from diffalign.objectives.lm_online import LanguageModelSelfPlay
from diffalign.objectives.self_play import large_margin_pairs


class LanguageModelDNO(LanguageModelSelfPlay):
    """Best vs worst of each group, when their rewards differ by at least ``objective.min_reward_gap``."""

    def __init__(self, config, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        self.min_gap = config.min_reward_gap

    def pairs(self, rewards):
        return (*large_margin_pairs(rewards, self.min_gap), {})
