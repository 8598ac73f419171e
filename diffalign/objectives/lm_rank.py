"""Listwise losses on a causal language model: K ranked completions per prompt.

Plackett-Luce DPO (Rafailov et al. 2023, App. A.3), LiPO's lambda loss (Liu et al. 2024) and the other
listwise losses of :mod:`diffalign.losses` on the completions' summed token log-probs; the list is best
first, or ordered by its ``scores`` column, which the losses that use gains also read.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.lm import ranked_preference_loss
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


class LanguageModelRank(LanguageModelObjective):
    """Listwise losses on an LM's completion log-probs; see the module docstring."""

    paper = "listwise losses (Plackett-Luce, LambdaRank, ...: diffalign losses)"

    dataset = "text_ranked"
    loss_kinds = ("listwise",)

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return ranked_preference_loss(policy, reference, batch["inputs"], list_size=batch["list_size"], loss=self.name,
                                      beta=self.beta, scores=batch["targets"].get("scores"), **self.options)
