"""KTO and the other unpaired losses on a causal language model: (prompt, completion, label) rows.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8) with its reference point z_0 estimated on the
batch's mismatched prompt-completion pairs (each prompt with the previous row's completion), averaged
over the processes, as TRL's ``KTOTrainer``; BCO (Jung et al. 2024, Sec. 3.2) with its running reward
shift kept in the checkpoints and, with ``objective.options.udm``, its underlying distribution matching (Sec. 3.3:
each undesirable row weighted by its prompt's density ratio, from a classifier fitted on the prompts' embeddings
before training, :mod:`diffalign.losses.udm`); NPO on the undesirable rows. :func:`diffalign.lm.unpaired_preference_loss`
does the maths; this file gives it the trainer's batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign.lm import mismatched_completions, unpaired_preference_loss
from diffalign.lm.preference import reference_context
from diffalign.lm.tokenize import collate
from diffalign.losses import RewardShift
from diffalign.losses.udm import UDMClassifier
from diffalign.objectives.lm import LanguageModelObjective
from diffalign.objectives.udm import UDMOptions, check_udm, rejected_weights, sample_by_label

Tensor = torch.Tensor


def prompt_embeddings(model, inputs: dict[str, Tensor]) -> Tensor:
    """(N, D) each row's prompt embedding: the model's last hidden state averaged over the prompt's tokens."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    prompt = (inputs["attention_mask"] * (1 - inputs["completion_mask"])).unsqueeze(-1).float()
    return (out.hidden_states[-1].float() * prompt).sum(1) / prompt.sum(1).clamp(min=1.0)


class LanguageModelKTO(LanguageModelObjective):
    """Unpaired losses on single labelled completions; see the module docstring."""

    paper = "Ethayarajh et al. 2024, arXiv 2402.01306"

    dataset = "text_unpaired"
    loss_kinds = ("unpaired",)
    Options = UDMOptions

    def __init__(self, config, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.pad_token_id = 0 if tokenizer is None else tokenizer.pad_token_id
        self.reward_shift = RewardShift() if self.name == "bco" and "delta" not in self.options else None
        self.udm = self.options_of(config)
        self.classifier = UDMClassifier() if self.udm.udm else None

    @classmethod
    def check_config(cls, config) -> None:
        check_udm(cls.options_of(config.objective), config.objective.loss)

    def attach(self, module: nn.Module) -> list[Any]:
        """BCO's running reward shift and its UDM classifier go into the checkpoints."""
        return [state for state in (self.reward_shift, self.classifier) if state is not None]

    def fit_to_data(self, dataset, reference, device: torch.device, seed: int) -> None:
        """Fit the UDM classifier (when ``udm``) on up to ``udm_sample_size`` prompts of each label, drawn with the
        run's seed, embedded by the reference (the base, or ``model.reference``)."""
        if self.classifier is None:
            return
        embedded = {}
        with torch.no_grad():
            for label, examples in sample_by_label(dataset, self.udm.udm_sample_size, seed, lambda e: e.label).items():
                groups = [e.group for e in examples]
                parts = [prompt_embeddings(reference, {k: v.to(device) for k, v in collate(
                    groups[i:i + 64], pad_token_id=self.pad_token_id, max_length=None).items()}).cpu()
                    for i in range(0, len(groups), 64)]
                embedded[label] = torch.cat(parts)
        self.classifier.fit(embedded[True], embedded[False])

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, labels = batch["inputs"], batch["targets"]["labels"]
        kl_batch = None
        if self.name == "kto" and "kl" not in self.options and len(inputs["input_ids"]) > 1:
            kl_batch = mismatched_completions(inputs, self.pad_token_id)  # on the batch's device
        options = dict(self.options)
        if self.classifier is not None and not bool(labels.all()):
            with torch.no_grad(), reference_context(policy, reference) as ref:
                options["rejected_weights"] = rejected_weights(self.classifier, prompt_embeddings(ref, inputs),
                                                               labels.bool(), self.udm)
        loss, metrics = unpaired_preference_loss(policy, reference, inputs, labels=labels, loss=self.name,
                                                 beta=self.beta, kl_batch=kl_batch, reward_shift=self.reward_shift,
                                                 mean_over_processes=self.mean_over_processes, **options)
        if "rejected_weights" in options:
            metrics["udm_weight"] = options["rejected_weights"].mean()
        return loss, metrics
