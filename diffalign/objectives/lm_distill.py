"""Distillation of a causal LM from a teacher (``model.teacher``) on completions, with any distillation loss of
:mod:`diffalign.losses.distillation`: LSKD's standardised KD (``ls_kd``), Plackett-Luce distillation (``pld``),
the teacher's soft cross-entropy (``mimic_kd``, LLaVA-MoD's mimic stage), AlignDistil's token-level distillation of a
DPO teacher extrapolated past a reference (``aligndistil``; the reference is ``model.reference``, the paper's reverse
DPO model, or else the base).

Each completion token's student logits are matched to the teacher's at the same position (the logits that predict
it), the loss is the mean over a row's completion tokens and then over the batch. Student and teacher must share a
tokenizer (the losses compare distributions over one vocabulary); the student may be a smaller architecture, built
with random weights (``model.random_init``) or from its own checkpoint. Data: ``data.path`` in the prompt-completion
layout (``text_completions``; a kto-mix table works, its labels unread).

``objective.options.cache_teacher``: keep each row's teacher logits in host memory the first time the row is seen and
reuse them later (one teacher forward per row for the whole run instead of one per epoch); it costs V floats per
token, so it pays when the data is small enough to be seen several times. Cached or not, the loss is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.config import ranged
from diffalign.errors import UserError
from diffalign.lm.preference import reference_context
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor


@dataclass
class DistillOptions:
    # keep each row's teacher logits in host memory after its first step and reuse them (V floats per token)
    cache_teacher: bool = False
    # the dtype the teacher runs in: auto is bf16 on a GPU and fp32 on a CPU
    teacher_dtype: str = ranged("auto", ("auto", "fp32", "bf16", "fp16"))


class LanguageModelDistill(LanguageModelObjective):
    """A student's token distributions matched to a teacher's; see the module docstring."""

    paper = "LSKD (Sun et al. 2024), PLD, LLaVA-MoD's mimic (Shu et al. 2024), AlignDistil (Zhang et al. 2025)"

    dataset = "text_completions"
    loss_kinds = ("distillation",)
    supplies = ("reference_logits",)
    reads_packed = False  # the losses read every token's distribution from the padded rows
    reads_teacher = True
    Options = DistillOptions

    def __init__(self, config, tokenizer: Any = None, teacher: nn.Module | None = None) -> None:
        super().__init__(config, tokenizer)
        options = self.options_of(config)
        self.teacher, self.cache = teacher, {} if options.cache_teacher else None
        self.teacher_dtype = options.teacher_dtype

    @classmethod
    def build(cls, config, tokenizer: Any) -> "LanguageModelDistill":
        """Loads ``model.teacher`` (a causal-LM folder or a finished run), refused unless it has the student's
        tokenizer."""
        from diffalign.lm.loading import causal_lm_folder, load_trained_lm

        source = config.model.teacher
        teacher, teacher_tokenizer = load_trained_lm(source if Path(source, "final").is_dir()
                                                     else causal_lm_folder(source))
        if tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"model.teacher={source}: its tokenizer is not the student's ({config.model.path}); "
                            "distillation compares the two models' distributions over one vocabulary")
        return cls(config.objective, tokenizer, teacher.requires_grad_(False).eval())

    @classmethod
    def check_config(cls, config) -> None:
        if not config.model.teacher:
            raise UserError("lm_distill distils a student from a teacher: set model.teacher to a causal-LM folder or a "
                            "finished run with the student's tokenizer")

    def _teacher_logits(self, inputs: dict[str, Tensor]) -> Tensor:
        """(N, T - 1, V) the teacher's logits at every position but the last, from the cache where it has them."""
        from diffalign.diffusion import resolve_dtype

        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device, dtype=resolve_dtype(self.teacher_dtype, device))
        lengths = inputs["attention_mask"].sum(1).tolist()
        keys = [tuple(row[:n].tolist()) for row, n in zip(inputs["input_ids"], lengths)]
        if self.cache is not None and all(key in self.cache for key in keys):
            rows = [self.cache[key].to(device) for key in keys]
            out = rows[0].new_zeros(len(rows), inputs["input_ids"].shape[1] - 1, rows[0].shape[-1])
            for i, row in enumerate(rows):
                out[i, :len(row)] = row
            return out
        with torch.no_grad():
            logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        logits = logits[:, :-1].float()
        if self.cache is not None:
            for key, row, n in zip(keys, logits, lengths):
                self.cache.setdefault(key, row[:n - 1].cpu())
        return logits

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = batch["inputs"]
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        student = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        teacher = self._teacher_logits(inputs)
        if student.shape[-1] != teacher.shape[-1]:
            raise UserError(f"the student's {student.shape[-1]} logits per token are not the teacher's "
                            f"{teacher.shape[-1]}: distillation needs one vocabulary")
        labels, mask = ids[:, 1:], inputs["completion_mask"][:, 1:]
        extra = {}
        if "reference_logits" in self.spec.inputs:  # AlignDistil's second teacher: model.reference, or the base
            with torch.no_grad(), reference_context(policy, reference) as ref:
                extra["reference_logits"] = ref(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        per_row = self.spec.fn(student, teacher, mask, labels=labels, **extra, **self.options)
        with torch.no_grad():  # how far the student is from the teacher, whatever the loss: KL(teacher || student)
            log_t, log_s = teacher.log_softmax(-1), student.float().log_softmax(-1)
            kl = (log_t.exp() * (log_t - log_s)).sum(-1)
            m = mask.float()
            metrics = {"teacher_kl": (kl * m).sum() / m.sum(),
                       "teacher_agreement": ((student.argmax(-1) == teacher.argmax(-1)).float() * m).sum() / m.sum()}
        return per_row.mean(), metrics
