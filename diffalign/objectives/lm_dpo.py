"""DPO and every pairwise loss on a causal language model: (prompt, chosen, rejected) pairs.

The likelihood proxy is the completion's summed token log-prob (:func:`diffalign.lm.sequence_logps`);
the loss is any pairwise, reference-free or soft-label core loss of :mod:`diffalign.losses`, or ``sft`` alone (``dpo``
is Rafailov et al. 2023, Eq. 7, TRL's ``sigmoid``; ``ipo``, ``hinge``, ``robust``, ``simpo``, ...), so
this objective is TRL's ``DPOTrainer`` with every loss of the registry. ``data.weight_column`` weights
each pair's loss, ``data.margin_column`` gives ``dpo_margin`` its per-pair margin (ODPO) and
``data.reward_columns`` gives ``madpo`` and ``da_dpo`` each pair's reward gap, as on diffusion. How a completion is
scored is set under ``objective.options``: ``average_logps`` (the mean token log-prob, SimPO's and ORPO's score) and
``ld_alpha`` (LD-DPO's length desensitisation), which change the likelihood proxy, not the loss, so any pairwise loss
takes them (:data:`diffalign.lm.logprobs.SCORE_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import ObjectiveConfig, ranged
from diffalign.lm import preference_loss
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


@dataclass
class CompletionScoreOptions:
    # score each completion by its mean token log-prob instead of the sum (SimPO's and ORPO's length-normalised score)
    average_logps: bool = False
    # LD-DPO (Liu et al. 2024, arXiv 2409.06411, Eq. 9): the tokens past the shorter completion of a pair count with
    # this weight (1: the plain sum); unset: off
    ld_alpha: float | None = ranged(None, "[0, 1]")


class LanguageModelDPO(LanguageModelObjective):
    """Pairwise preference losses on an LM's completion log-probs; see the module docstring."""

    paper = "Rafailov et al. 2023, arXiv 2305.18290 (and every pairwise loss: diffalign losses)"

    dataset = "text_pairs"
    loss_kinds = ("pairwise", "reference-free", "soft-label", "regulariser")  # sft: TRL's loss_type "sft"

    Options = CompletionScoreOptions

    def __init__(self, config: ObjectiveConfig, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.scoring = self.options_of(config)

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        targets = batch["targets"]
        options = dict(self.options)
        for per_pair in ("margin", "reward_gap"):  # data.margin_column, data.reward_columns
            if per_pair in targets:
                options[per_pair] = targets[per_pair]
        if self.spec.kind == "soft-label":
            options["preference"] = targets["preference"]
        return preference_loss(policy, reference, batch["inputs"], loss=self.name, beta=self.beta,
                               weights=targets.get("weight"), average_logps=self.scoring.average_logps,
                               ld_alpha=self.scoring.ld_alpha, **options)
