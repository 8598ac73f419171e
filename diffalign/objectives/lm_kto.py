"""KTO and the other unpaired losses on a causal language model: (prompt, completion, label) rows.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8) with its reference point z_0 estimated on the
batch's mismatched prompt-completion pairs (each prompt with the previous row's completion), averaged
over the processes, as TRL's ``KTOTrainer``; BCO (Jung et al. 2024, Sec. 3.2) with its running reward
shift kept in the checkpoints; NPO on the undesirable rows. :func:`diffalign.lm.unpaired_preference_loss`
does the maths; this file gives it the trainer's batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign.lm import mismatched_completions, unpaired_preference_loss
from diffalign.losses import RewardShift
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


class LanguageModelKTO(LanguageModelObjective):
    """Unpaired losses on single labelled completions; see the module docstring."""

    paper = "Ethayarajh et al. 2024, arXiv 2402.01306"

    dataset = "text_unpaired"
    loss_kinds = ("unpaired",)

    def __init__(self, config, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.pad_token_id = 0 if tokenizer is None else tokenizer.pad_token_id
        self.reward_shift = RewardShift() if self.name == "bco" and "delta" not in self.options else None

    def attach(self, module: nn.Module) -> list[Any]:
        """BCO's running reward shift goes into the checkpoints."""
        return [] if self.reward_shift is None else [self.reward_shift]

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = batch["inputs"]
        kl_batch = None
        if self.name == "kto" and "kl" not in self.options and len(inputs["input_ids"]) > 1:
            kl_batch = mismatched_completions(inputs, self.pad_token_id)  # on the batch's device
        return unpaired_preference_loss(policy, reference, inputs, labels=batch["targets"]["labels"], loss=self.name,
                                        beta=self.beta, kl_batch=kl_batch, reward_shift=self.reward_shift,
                                        mean_over_processes=self.mean_over_processes, **self.options)
