"""Preference losses on a text LM: run policy and reference on a chosen/rejected batch.

The batch stacks the B chosen sequences, then the B rejected ones, as (2B, T) ``input_ids``,
``attention_mask`` and ``completion_mask``. One forward of the policy (and one of the
reference, in no_grad) covers both halves. Any pairwise-signature loss of
:mod:`diffalign.losses` applies.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from diffalign import losses
from diffalign.lm.logprobs import sequence_logps

Tensor = torch.Tensor


def _scores(model: torch.nn.Module, batch: dict[str, Tensor], average: bool, ld_alpha: float | None):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logps(
        out.logits, batch["input_ids"], batch["completion_mask"], average=average, ld_alpha=ld_alpha
    )


def _reference_context(policy: torch.nn.Module, reference: torch.nn.Module | None):
    """With no separate reference, a PEFT policy with adapters disabled is the reference."""
    if reference is not None:
        return contextlib.nullcontext(reference)
    if hasattr(policy, "disable_adapter"):
        return _adapters_disabled(policy)
    raise ValueError(
        "this loss needs a reference model: pass reference=..., or train a LoRA (PEFT) policy "
        "whose base with adapters disabled is the reference"
    )


@contextlib.contextmanager
def _adapters_disabled(policy: torch.nn.Module):
    with policy.disable_adapter():
        yield policy


def _length_options(fn, lengths: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    params = inspect.signature(fn).parameters
    chosen, rejected = lengths
    return {k: v for k, v in (("chosen_lengths", chosen), ("rejected_lengths", rejected)) if k in params}


def preference_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict[str, Tensor],
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    average_logps: bool = False,
    ld_alpha: float | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean preference loss of the batch and its metrics (implicit rewards, accuracy).

    ``average_logps`` scores each completion by its mean token log-prob (SimPO/ORPO);
    otherwise by the sum, and losses that take ``chosen_lengths``/``rejected_lengths`` (IPO,
    RPO, ...) receive the completion lengths.
    """
    spec = losses.spec(loss)
    scores, lengths = _scores(policy, batch, average_logps, ld_alpha)
    pc, pr = scores.chunk(2)
    rc = rr = None
    if spec.needs_reference:
        with torch.no_grad(), _reference_context(policy, reference) as ref_model:
            ref_scores, _ = _scores(ref_model, batch, average_logps, ld_alpha)
        rc, rr = ref_scores.chunk(2)
    if not average_logps:
        options = {**_length_options(spec.fn, lengths.chunk(2)), **options}
    per_example = spec.fn(pc, pr, rc, rr, beta=beta, **options)
    metrics = losses.preference_metrics(pc, pr, rc, rr, beta=beta)
    metrics["logps/chosen"] = pc.detach().mean()
    metrics["logps/rejected"] = pr.detach().mean()
    return per_example.mean(), metrics
