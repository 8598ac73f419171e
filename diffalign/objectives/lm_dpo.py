"""DPO and every pairwise loss on a causal language model: (prompt, chosen, rejected) pairs.

The likelihood proxy is the completion's summed token log-prob (:func:`diffalign.lm.sequence_logps`);
the loss is any pairwise, reference-free or soft-label core loss of :mod:`diffalign.losses`, or ``sft`` alone (``dpo``
is Rafailov et al. 2023, Eq. 7, TRL's ``sigmoid``; ``ipo``, ``hinge``, ``robust``, ``simpo``, ...), so
this objective is TRL's ``DPOTrainer`` with every loss of the registry. ``data.weight_column`` weights
each pair's loss, ``data.margin_column`` gives ``dpo_margin`` its per-pair margin (ODPO) and
``data.reward_columns`` gives ``madpo`` and ``da_dpo`` each pair's reward gap, as on diffusion.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.lm import preference_loss
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


class LanguageModelDPO(LanguageModelObjective):
    """Pairwise preference losses on an LM's completion log-probs; see the module docstring."""

    paper = "Rafailov et al. 2023, arXiv 2305.18290 (and every pairwise loss: diffalign losses)"

    dataset = "text_pairs"
    loss_kinds = ("pairwise", "reference-free", "soft-label", "regulariser")  # sft: TRL's loss_type "sft"

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        targets = batch["targets"]
        options = dict(self.options)
        for per_pair in ("margin", "reward_gap"):  # data.margin_column, data.reward_columns
            if per_pair in targets:
                options[per_pair] = targets[per_pair]
        if self.spec.kind == "soft-label":
            options["preference"] = targets["preference"]
        return preference_loss(policy, reference, batch["inputs"], loss=self.name, beta=self.beta,
                               weights=targets.get("weight"), **options)
