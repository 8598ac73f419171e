"""RSO on a causal LM (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization", arXiv
2309.06657, Algorithm 1; the setting the paper was written for): each round pi_t samples K completions per prompt,
``objective.options.accepted`` of them are drawn from pi*(y | x) ∝ pi_t(y | x) exp(r(x, y) / beta) by rejection,
paired in acceptance order and labelled by the reward, and a pairwise loss trains them against pi_t.

The rule is the diffusion loop's (:func:`diffalign.objectives.rso.rejection_pairs`); the paper's sigmoid-norm loss
is ``dpo``, its hinge-norm ``hinge``. The paper draws 64 candidates and accepts 8 from an SFT policy; round 0 here
is that from the base, and later rounds repeat it from the improved policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives.lm_online import LanguageModelSelfPlay, LMSamplingOptions
from diffalign.objectives.rso import RSO, RSOOptions, RejectionSampled


@dataclass
class LMRSOOptions(LMSamplingOptions, RSOOptions):
    """RSO's acceptance and the rounds' sampling."""


class LanguageModelRSO(RejectionSampled, LanguageModelSelfPlay):
    """Pairs of rejection-sampled completions, the better first."""

    paper = RSO.paper

    Options = LMRSOOptions
    group_size = 8

    def pairs(self, rewards, generator):
        return self.rejection_pairs(rewards, generator)
