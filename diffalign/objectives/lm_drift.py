"""DRIFT on a causal LM (Wang et al. 2025, "Learning from Abundant User Dissatisfaction in Real-World Preference
Learning", arXiv 2510.02341, Algorithm 1; the setting the paper was written for): the completions users were
dissatisfied with (DSAT) stay fixed negatives, and each positive is drawn fresh from the evolving policy.

``data.path`` is a table in KTO's unpaired layout (prompt, completion, label); its undesirable rows are the
dissatisfying completions. Round t pairs the next ``online.groups_per_round`` of them with one completion pi_t
samples for the same prompt, the fresh one chosen, and a pairwise loss (DPO, as the paper) trains them against pi_t.
No reward or label is needed during the run. The diffusion loop is :mod:`diffalign.objectives.drift`.
"""

from __future__ import annotations

from diffalign.objectives.drift import DRIFT
from diffalign.objectives.lm_online import LanguageModelSelfPlay


class LanguageModelDRIFT(LanguageModelSelfPlay):
    """pi_t's fresh completion for each dissatisfying completion's prompt, chosen over it."""

    paper = DRIFT.paper

    group_size = 1  # one fresh positive per dissatisfying completion
    group_size_fixed = True
    real_data = True
    real_layout = "text_unpaired"
    scored = False
    real_is_chosen = False

    @classmethod
    def check_sampling(cls, config) -> None:
        """No reward to check: the data's completions are the negatives."""
