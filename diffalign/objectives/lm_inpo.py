"""INPO on a causal LM (Zhang et al. 2024, "Iterative Nash Policy Optimization", arXiv 2407.00617): each
round pi_t samples K completions per prompt, the best and worst make a pair, and the ``inpo_nash`` loss
regresses the policy's log-ratio on a geometric mix of the base and pi_t (the base is the reference, pi_t's
log-probs of the pair are the loss's per-pair inputs, computed on the batch)."""

from __future__ import annotations

from typing import Any

import torch

from diffalign.lm import completion_logps
from diffalign.objectives.lm_online import LanguageModelSelfPlay

Tensor = torch.Tensor


class LanguageModelINPO(LanguageModelSelfPlay):
    """Best vs worst of each group; the base as the reference and pi_t's scores as inputs."""

    paper = "Zhang et al. 2024, arXiv 2407.00617"

    frozen_reference = True
    loss_names = ("inpo_nash",)
    supplies = ("previous_chosen", "previous_rejected")

    def reference_for(self, reference):
        return reference  # the base (a LoRA run: its base with adapters disabled)

    def extra_inputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        with torch.no_grad():
            previous, _ = completion_logps(self.previous_round(), batch["inputs"])
        chosen, rejected = previous.chunk(2)
        return {"previous_chosen": chosen, "previous_rejected": rejected}
