"""Listwise losses on a causal language model: K ranked completions per prompt.

Plackett-Luce DPO (Rafailov et al. 2023, App. A.3), LiPO's lambda loss (Liu et al. 2024) and the other
listwise losses of :mod:`diffalign.losses` on the completions' summed token log-probs; the list is best
first, or ordered by its ``scores`` column, which the losses that use gains also read. With
``objective.options.adaptive_step_reward`` and ``data.step_pattern`` each completion is scored by TPO's
Adaptive Step Reward instead (Liao et al. 2024, :mod:`diffalign.lm.step_reward`): with ``loss=tpo``, TPO as
its authors train it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.errors import UserError
from diffalign.lm import ranked_preference_loss
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


@dataclass
class LMRankOptions:
    # TPO's Adaptive Step Reward (Liao et al. 2024, arXiv 2410.12854): a completion's score is the mean of
    # its steps' mean token log-probs, each step weighted by 1 + its cosine similarity (policy's last hidden states)
    # to the same step of the list's best completion. Needs data.step_pattern (where steps begin); false: summed log-probs
    adaptive_step_reward: bool = False


class LanguageModelRank(LanguageModelObjective):
    """Listwise losses on an LM's completion log-probs; see the module docstring."""

    paper = "listwise losses (Plackett-Luce, LambdaRank, ...: diffalign losses); TPO's step reward, arXiv 2410.12854"

    dataset = "text_ranked"
    loss_kinds = ("listwise",)

    Options = LMRankOptions

    def __init__(self, config, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.adaptive_step_reward = self.options_of(config).adaptive_step_reward

    @classmethod
    def check_config(cls, config) -> None:
        adaptive = cls.options_of(config.objective).adaptive_step_reward
        if adaptive and config.data.step_pattern is None:
            raise UserError("objective.options.adaptive_step_reward weighs each completion's steps: set "
                            "data.step_pattern to the regular expression that begins a step (TPO's \"\\nStep \\d+:\")")
        if config.data.step_pattern is not None and not adaptive:
            raise UserError(f"data.step_pattern={config.data.step_pattern!r} numbers steps that only "
                            "objective.options.adaptive_step_reward=true reads: set it, or remove the pattern")
        if adaptive and config.data.packing:
            raise UserError("objective.options.adaptive_step_reward reads padded rows (their hidden states step by "
                            "step): turn data.packing off")

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return ranked_preference_loss(policy, reference, batch["inputs"], list_size=batch["list_size"], loss=self.name,
                                      beta=self.beta, scores=batch["targets"].get("scores"),
                                      adaptive_step_reward=self.adaptive_step_reward, **self.options)
