"""What the language-model objectives share: the causal LM's sequence log-probs as the likelihood proxy
(:mod:`diffalign.lm`), a core loss chosen by name, and the trainer's micro-batch of tokenized rows.

The trainer hands each call ``policy`` (the trained, possibly DDP-wrapped model), ``reference`` (a frozen
copy, or for a LoRA run the base with its adapters disabled; None for reference-free losses) and the
batch: ``inputs`` (rank-major ``input_ids``, ``attention_mask``, ``completion_mask``) and ``targets``
(per-row labels, per-pair weights and margins, per-list scores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from diffalign import losses
from diffalign.objectives.base import Objective

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


class LanguageModelObjective(Objective):
    """Base of the LM objectives: the loss spec, beta and options from the config."""

    family = "lm"
    reads_packed = True  # scores a packed batch (data.packing) through diffalign.lm's scores

    def __init__(self, config: ObjectiveConfig, tokenizer: Any = None) -> None:
        """``tokenizer``: the model's, for objectives that build token rows of their own (KTO's mismatched rows)."""
        own = getattr(self, "own_losses", None)  # an objective of its own (DisCO's), not a registered loss
        self.spec = None if own else losses.spec(config.loss)
        if self.spec is not None and self.spec.kind not in self.loss_kinds:
            raise ValueError(f"{type(self).__name__} takes a {' or '.join(self.loss_kinds)} loss; "
                             f"{config.loss!r} is {self.spec.kind}")
        self.name, self.beta, self.options = config.loss, config.beta, dict(config.loss_options)

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer passes the frozen reference (the base) to each call."""
        return self.spec is not None and self.spec.needs_reference

    def fit_to_data(self, dataset, reference, device, seed: int) -> None:
        """Called once before the first step with the run's dataset and reference, for what an objective learns from
        the data before training (BCO's UDM classifier); default nothing."""

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError
