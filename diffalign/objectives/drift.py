"""DRIFT, Dissatisfaction-Refined Iterative preFerence Training (Wang et al. 2025, "Learning from Abundant
User Dissatisfaction in Real-World Preference Learning", arXiv 2510.02341) on the round driver.

Deployed models collect many samples users were dissatisfied with (DSAT) and few they liked. DRIFT keeps
the dissatisfying samples as fixed negatives and draws each positive fresh from the evolving policy: round
t pairs the next ``online.groups_per_round`` dissatisfying images of ``data.path`` (captioned images: what
people, or a reward, marked as dissatisfying) with one sample of pi_t each for the same caption, the sample
first, and trains a pairwise loss (DPO, as the paper) against pi_t. No reward model and no label is needed
during the run. It is DDO's loop with the data image as the negative instead of the positive.
"""

from __future__ import annotations

from diffalign.objectives.self_play import SelfPlayObjective


class DRIFT(SelfPlayObjective):
    """pi_t's fresh sample for each dissatisfying image's caption, chosen over it.

    Called with ``latents`` (B, 2, C, h, w): the policy's sample, then the dissatisfying image.
    """

    paper = "Wang et al. 2025, arXiv 2510.02341"

    group_size = 1  # one fresh positive per dissatisfying image
    group_size_fixed = True
    real_data = True
    scored = False  # the data image is the negative, the fresh sample the positive: no reward, no label
    real_is_chosen = False
