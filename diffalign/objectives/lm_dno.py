"""DNO on a causal LM (Rosset et al. 2024, arXiv 2404.03715, Algorithm 2, DNO-Prct): each round pi_t samples
K completions per prompt; the best and worst make a pair when their rewards differ by at least
``objective.options.min_reward_gap``, trained with a contrastive pairwise loss (DPO by default) against pi_t."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives.dno import DNOOptions
from diffalign.objectives.lm_online import LanguageModelSelfPlay, LMSamplingOptions


@dataclass
class LMDNOOptions(LMSamplingOptions, DNOOptions):
    """DNO's margin filter and the rounds' sampling."""
from diffalign.objectives.self_play import large_margin_pairs


class LanguageModelDNO(LanguageModelSelfPlay):
    """Best vs worst of each group, when their rewards differ by at least ``objective.options.min_reward_gap``."""

    paper = "Rosset et al. 2024, arXiv 2404.03715"

    Options = LMDNOOptions

    def __init__(self, config, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        self.min_gap = self.options_of(config).min_reward_gap

    def pairs(self, rewards, generator):
        return (*large_margin_pairs(rewards, self.min_gap), {})
