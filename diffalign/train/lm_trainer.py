"""The trainer on a causal language model: the same loop as the diffusion one (accelerate, checkpoints,
exact resume, DDP, NaN guard, trackers, bad-row handling), with the LM's parts in place of a pipeline's.

Models: ``model.path`` is a transformers causal-LM folder (or a cached Hub id); ``train.lora_rank`` > 0
trains a peft LoRA whose base, with the adapters disabled, is the reference (no second copy), as TRL
does; a full fine-tune keeps a frozen reference copy in ``train.reference_dtype``. Data: TRL's formats
(:mod:`diffalign.data.text`), tokenized as TRL tokenizes them (:mod:`diffalign.lm.tokenize`), each
micro-batch padded to its own longest row, or packed (``data.packing``, :mod:`diffalign.lm.packing`); the
completion lengths and the share of padding are logged. Final weights: the model
or the adapter, with the tokenizer, in ``final/`` (``save_pretrained``'s layout, safetensors). The online
LM objectives take their batches from rounds of the policy's own completions (:mod:`diffalign.train.lm_online`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model
from torch import nn

from diffalign.data.open import open_dataset
from diffalign.data.uncertainty import keep_reliable_pairs
from diffalign.diffusion import mixed_precision_dtype, resolve_dtype
from diffalign.errors import UserError
from diffalign.lm.loading import causal_lm_folder, load_causal_lm, load_tokenizer, load_trained_lm
from diffalign.lm.packing import padding_share
from diffalign.lm.tokenize import collate
from diffalign.paths import with_usual_permissions
from diffalign.train.lm_online import TextRounds
from diffalign.train.trainer import PreferenceTrainer


class BaseWithoutAdapters:
    """A LoRA policy's base as the reference: the same module, called with its adapters disabled."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model

    def __call__(self, **inputs: Any):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


class LanguageModelTrainer(PreferenceTrainer):
    """:class:`PreferenceTrainer` on a causal LM; see the module docstring."""

    def __init__(self, config) -> None:
        # read once, first: the data is tokenized as it is read, and a folder that holds no causal LM (a
        # diffusers pipeline) is refused before anything else loads
        self.tokenizer = load_tokenizer(causal_lm_folder(config.model.path))
        super().__init__(config)

    def _build_models(self, frozen_reference: bool) -> None:
        mc, tc = self.config.model, self.config.train
        device = self.accelerator.device
        weight_dtype = mixed_precision_dtype(tc.mixed_precision)
        model = load_causal_lm(mc.path, random_init=mc.random_init, seed=tc.seed)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.reference = None
        if tc.lora_rank > 0:
            model.requires_grad_(False).to(dtype=weight_dtype)
            lora = LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank, lora_dropout=0.0,
                              target_modules=_targets(tc.lora_targets), task_type="CAUSAL_LM")
            try:
                model = get_peft_model(model, lora)
            except ValueError as err:
                raise UserError(f"train.lora_targets={list(tc.lora_targets)}: {err}") from None
            cast_training_params(model, dtype=torch.float32)  # fp32 master weights for the adapters
            self.reference = BaseWithoutAdapters(model)
        if mc.reference is not None:  # another model than the base (checked: the objective has a fixed reference)
            self.reference = self._other_reference(mc.reference)
        elif frozen_reference and tc.lora_rank == 0:
            reference = copy.deepcopy(model).requires_grad_(False).eval()
            self.reference = reference.to(device, dtype=resolve_dtype(tc.reference_dtype, device))
        self.module = model.to(device).train()
        if mc.compile:
            self.module.compile()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.backbone, self.encoder = None, None

    def _other_reference(self, source: str) -> nn.Module:
        """``model.reference`` (a causal-LM folder or a finished run), frozen in ``train.reference_dtype``; refused
        when its vocabulary is not the policy's, since the losses compare the two models' log-probs of one text."""
        reference, tokenizer = load_trained_lm(causal_lm_folder(source) if not Path(source, "final").is_dir()
                                               else source)
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise UserError(f"model.reference={source}: its tokenizer is not the policy's ({self.config.model.path}); "
                            "the reference must score the same token ids")
        device = self.accelerator.device
        return reference.requires_grad_(False).eval().to(device, dtype=resolve_dtype(self.config.train.reference_dtype,
                                                                                      device))

    def _fit_objective_to_data(self) -> None:
        """The LM objectives embed prompts with the reference themselves (BCO's UDM classifier)."""
        self.objective.fit_to_data(self.dataset, self.reference if self.reference is not None else self.module,
                                   self.accelerator.device, self.config.train.seed)

    def _make_objective(self, objective_cls: type) -> Any:
        return objective_cls.build(self.config, self.tokenizer)

    def _load_dataset(self, layout: str) -> Any:
        dataset = open_dataset(self.config.data, layout, self.tokenizer)
        dc = self.config.data
        if layout == "text_pairs" and dc.estimator is not None:
            keep_reliable_pairs(dataset, dc.estimator, passes=dc.estimator_passes, keep=dc.estimator_keep,
                                seed=self.config.train.seed)
        return dataset

    def _make_rounds(self, reads_data: bool) -> TextRounds:
        return TextRounds(self.config, self.module, self.tokenizer, self.output_dir, self.accelerator, self.objective,
                          real=self.dataset if reads_data else None)

    def _micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        if self.online:
            return self.rounds.micro_batch(step, micro)
        examples = [e for _, e in self._examples(step, micro)]
        device = self.accelerator.device
        inputs = collate([e.group for e in examples], pad_token_id=self.tokenizer.pad_token_id,
                         max_length=self.config.data.max_length, packed=self.config.data.packing)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        targets: dict[str, torch.Tensor] = {}
        if examples[0].label is not None:
            targets["labels"] = torch.tensor([e.label for e in examples], device=device)
        if examples[0].scores is not None:
            targets["scores"] = torch.stack([e.scores for e in examples]).to(device)
        if self.config.data.weight_column is not None:
            targets["weight"] = torch.tensor([e.weight for e in examples], device=device)
        if self.config.data.margin_column is not None:
            targets["margin"] = torch.tensor([e.margin for e in examples], device=device)
        if self.config.data.reward_columns:
            targets["reward_gap"] = torch.tensor([e.reward_gap for e in examples], device=device)
        targets["preference"] = torch.tensor([e.preference for e in examples], device=device)
        lengths = inputs["completion_mask"].sum(dim=1).float()
        logged = {"completion_tokens": lengths.mean(), "sequence_tokens": inputs["attention_mask"].sum(1).float().mean(),
                  "padding_share": torch.tensor(padding_share(inputs))}
        return {"inputs": inputs, "targets": targets, "list_size": len(examples[0].group.completions),
                "logged": logged}

    def _objective_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective(self.trained, self.reference if self.objective.needs_reference else None, batch)

    def _save_final_weights(self, weights: dict[str, torch.Tensor], folder: Path) -> Path:
        model = self.accelerator.unwrap_model(self.trained)
        model.save_pretrained(str(folder), state_dict=weights, safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        return with_usual_permissions(folder)


def _targets(targets: list[str]) -> list[str] | str:
    """peft's target_modules: "all-linear" (every linear layer but the output head) as its own word."""
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)
