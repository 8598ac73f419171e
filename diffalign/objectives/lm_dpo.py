"""DPO and every pairwise loss on a causal language model: (prompt, chosen, rejected) pairs.

The likelihood proxy is the completion's summed token log-prob (:func:`diffalign.lm.sequence_logps`);
the loss is any pairwise, reference-free or soft-label core loss of :mod:`diffalign.losses`, or ``sft`` alone (``dpo``
is Rafailov et al. 2023, Eq. 7, TRL's ``sigmoid``; ``ipo``, ``hinge``, ``robust``, ``simpo``, ...), so
this objective is TRL's ``DPOTrainer`` with every loss of the registry. ``data.weight_column`` weights
each pair's loss, ``data.margin_column`` gives ``dpo_margin`` its per-pair margin (ODPO) and
``data.reward_columns`` gives ``madpo`` and ``da_dpo`` each pair's reward gap, as on diffusion. How a completion is
scored is set under ``objective.options``: ``average_logps`` (the mean token log-prob, SimPO's and ORPO's score) and
``ld_alpha`` (LD-DPO's length desensitisation), which change the likelihood proxy, not the loss, so any pairwise loss
takes them (:data:`diffalign.lm.logprobs.SCORE_OPTIONS`). ``data.curriculum=score_gap`` reads each epoch's pairs
from the largest reward gap (``data.reward_columns``) to the smallest, and ``refresh_reference_every`` makes the
policy the reference at each stage's start: Curry-DPO (Pattnaik et al. 2024) on LM pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torch import nn

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.errors import UserError
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


@dataclass
class LMDPOOptions(CompletionScoreOptions):
    # every this many optimiser steps the reference becomes the policy as it is then (0: the reference stays the
    # base): Curry-DPO's iterations (Pattnaik et al. 2024, Sec. 3), each stage's policy the next stage's reference;
    # with data.curriculum=score_gap, set it to the steps of one stage
    refresh_reference_every: int = ranged(0, "[0, inf)")


class LanguageModelDPO(LanguageModelObjective):
    """Pairwise preference losses on an LM's completion log-probs; see the module docstring."""

    paper = "Rafailov et al. 2023, arXiv 2305.18290 (and every pairwise loss: diffalign losses)"

    dataset = "text_pairs"
    loss_kinds = ("pairwise", "reference-free", "soft-label", "regulariser")  # sft: TRL's loss_type "sft"

    Options = LMDPOOptions

    def __init__(self, config: ObjectiveConfig, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.scoring = self.options_of(config)
        self.stage_reference: ShadowWeights | None = None
        self.optimizer_steps = 0

    @classmethod
    def check_config(cls, config) -> None:
        if cls.options_of(config.objective).refresh_reference_every and config.model.reference is not None:
            raise UserError("objective.options.refresh_reference_every makes the policy its own reference at each "
                            f"stage; model.reference={config.model.reference} fixes another one: remove one of them")

    def attach(self, module: nn.Module) -> list[Any]:
        """With ``refresh_reference_every``: the stage's reference, the trained weights as the stage began (kept as
        shadow weights, run through the live model, saved in every checkpoint)."""
        if not self.scoring.refresh_reference_every:
            return []
        self.stage_reference = ShadowWeights(module)
        return [self]

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.stage_reference is not None and self.optimizer_steps % self.scoring.refresh_reference_every == 0:
            self.stage_reference.update(0.0)  # a new stage: the policy as it is now

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.stage_reference.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_reference.load_state_dict(state["reference"])
        self.optimizer_steps = int(state["optimizer_steps"])

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.stage_reference is not None and self.spec.needs_reference:
            reference = self.stage_reference.denoiser()
        targets = batch["targets"]
        options = dict(self.options)
        for per_pair in ("margin", "reward_gap"):  # data.margin_column, data.reward_columns (when the loss reads it)
            if per_pair in targets and (per_pair in self.spec.inputs or per_pair in self.spec.options):
                options[per_pair] = targets[per_pair]
        if self.spec.kind == "soft-label":
            options["preference"] = targets["preference"]
        return preference_loss(policy, reference, batch["inputs"], loss=self.name, beta=self.beta,
                               weights=targets.get("weight"), average_logps=self.scoring.average_logps,
                               ld_alpha=self.scoring.ld_alpha, **options)
