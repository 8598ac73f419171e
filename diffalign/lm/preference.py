"""Preference losses on a text LM: run policy and reference on a batch of completions.

A pair batch stacks the B chosen sequences, then the B rejected ones, as (2B, T)
``input_ids``, ``attention_mask`` and ``completion_mask``; a ranked batch of K completions per
prompt stacks K such blocks, best first: (K * B, T), row k * B + i the k-th completion of prompt
i (a pair batch is the case K = 2). One forward of the policy (and one of the reference, in
no_grad) covers the whole batch. Pairwise-signature losses of :mod:`diffalign.losses` (pairwise,
unpaired, reference-free, soft-label) go through :func:`preference_loss`, listwise ones through
:func:`ranked_preference_loss`; an unpaired loss there reads each pair as one desirable and one
undesirable completion. Completions labelled one by one go through
:func:`diffalign.lm.unpaired_preference_loss`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from diffalign import losses
from diffalign.lm.logprobs import completion_scores, sequence_logps, token_logps
from diffalign.lm.packing import packed_forward, packed_token_logps
from diffalign.lm.step_reward import adaptive_step_weights, step_weighted_scores
from diffalign.losses.registry import LISTWISE, LOGIT_KINDS, LossSpec

Tensor = torch.Tensor


def _scores(model: torch.nn.Module, batch: dict[str, Tensor], average: bool, ld_alpha: float | None):
    """Each row's completion score and length; one forward on the packed rows when the batch has them
    (:mod:`diffalign.lm.packing`), else on the padded rows."""
    if "packed_input_ids" in batch:
        per_token = packed_token_logps(packed_forward(model, batch), batch)
        return completion_scores(per_token, batch["completion_mask"], average=average, ld_alpha=ld_alpha)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logps(
        out.logits, batch["input_ids"], batch["completion_mask"], average=average, ld_alpha=ld_alpha
    )


def completion_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False,
                     ld_alpha: float | None = None) -> tuple[Tensor, Tensor]:
    """Each row's completion log-prob (summed, or averaged) and completion length under ``model``."""
    return _scores(model, batch, average, ld_alpha)


def reference_context(policy: torch.nn.Module, reference: torch.nn.Module | None):
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


def _policy_and_reference_scores(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Tensor],
                                 spec: LossSpec, average: bool, ld_alpha: float | None):
    """Sequence scores of every row under the policy (with grad) and, when the loss needs it, the reference."""
    scores, lengths = _scores(policy, batch, average, ld_alpha)
    if not spec.needs_reference:
        return scores, None, lengths
    with torch.no_grad(), reference_context(policy, reference) as ref_model:
        ref_scores, _ = _scores(ref_model, batch, average, ld_alpha)
    return scores, ref_scores, lengths


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
    weights: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean preference loss of the batch and its metrics (implicit rewards, accuracy).

    ``average_logps`` scores each completion by its mean token log-prob (SimPO/ORPO);
    otherwise by the sum, and losses that take ``chosen_lengths``/``rejected_lengths`` (IPO,
    RPO, ...) receive the completion lengths. ``weights`` (one per pair) make the loss the mean of
    weight x loss, as a diffusion run's ``data.weight_column`` does; a per-pair margin goes in as the
    ``margin`` option of ``dpo_margin`` (a tensor, one per pair). The self-play losses take their per-pair
    inputs the same way: ``loss="sppo", win_chosen=..., win_rejected=...`` (:mod:`diffalign.losses.self_play`).
    """
    spec = losses.spec(loss)
    if spec.kind == LISTWISE:
        raise ValueError(f"{loss!r} is a listwise loss: use ranked_preference_loss with the list size")
    if spec.kind in LOGIT_KINDS:
        raise ValueError(f"{loss!r} is a {spec.kind} loss on logits: call losses.get({loss!r}) on the student's "
                         "and teacher's logits")
    missing = [name for name in spec.inputs if name not in options]
    if missing:
        raise ValueError(f"loss {loss!r} needs per-pair {', '.join(missing)} (one per pair, as keyword arguments); "
                         "diffalign.losses.self_play estimates win-rates and preference scores from K samples' rewards")
    scores, ref_scores, lengths = _policy_and_reference_scores(policy, reference, batch, spec, average_logps, ld_alpha)
    pc, pr = scores.chunk(2)
    rc, rr = (None, None) if ref_scores is None else ref_scores.chunk(2)
    if not average_logps:
        options = {**_length_options(spec.fn, lengths.chunk(2)), **options}
    per_example = spec.fn(pc, pr, rc, rr, beta=beta, **options)
    metrics = losses.preference_metrics(pc, pr, rc, rr, beta=beta)
    metrics["logps/chosen"] = pc.detach().mean()
    metrics["logps/rejected"] = pr.detach().mean()
    # Chen et al. 2024 ("Preference Learning Algorithms Do Not Learn Preference Rankings", arXiv 2405.19534):
    # the share of pairs whose chosen completion the policy itself scores higher, no reference involved (ties 1/2);
    # implicit_acc ranks by the log-ratio to the reference, which DPO can raise while this stays low
    gap = (pc - pr).detach()
    metrics["ranking_acc"] = (gap > 0).float().mean() + 0.5 * (gap == 0).float().mean()
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean(), metrics


def _adaptive_step_scores(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Tensor],
                          spec: LossSpec, list_size: int) -> tuple[Tensor, Tensor | None]:
    """TPO's Adaptive Step Reward (:mod:`diffalign.lm.step_reward`): each row's step-weighted mean token log-prob under
    the policy and the reference, both weighted by the policy's step similarities to the list's best completion."""
    if "step_index" not in batch:
        raise ValueError("the adaptive step reward needs each token's step (batch['step_index']): tokenize the lists "
                         "with a step pattern (data.step_pattern)")
    if "packed_input_ids" in batch:
        raise ValueError("the adaptive step reward reads padded rows, not packed ones: turn data.packing off")
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                 output_hidden_states=True)
    weights = adaptive_step_weights(out.hidden_states[-1], batch["step_index"], list_size)
    scores = step_weighted_scores(token_logps(out.logits, batch["input_ids"]), batch["step_index"], weights)
    if not spec.needs_reference:
        return scores, None
    with torch.no_grad(), reference_context(policy, reference) as ref_model:
        ref_logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
        ref_scores = step_weighted_scores(token_logps(ref_logits, batch["input_ids"]), batch["step_index"],
                                          weights.detach())
    return scores, ref_scores


def ranked_preference_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict[str, Tensor],
    *,
    list_size: int,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    scores: Tensor | None = None,
    average_logps: bool = False,
    ld_alpha: float | None = None,
    adaptive_step_reward: bool = False,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean listwise loss over B prompts with ``list_size`` = K completions each, and metrics.

    Rows are rank-major (see the module docstring): without ``scores`` the K completions of a
    prompt are ranked best first; ``scores`` (B, K), higher better, give the ranking (and the
    gains of losses that use them). The metrics compare each list's first and last completion.
    ``adaptive_step_reward`` scores each completion by TPO's Adaptive Step Reward
    (:mod:`diffalign.lm.step_reward`; the batch needs ``step_index``), in place of the summed log-prob.
    """
    spec = losses.spec(loss)
    if spec.kind != LISTWISE:
        raise ValueError(f"{loss!r} is a {spec.kind} loss: use preference_loss")
    rows = batch["input_ids"].shape[0]
    if list_size < 2 or rows % list_size:
        raise ValueError(f"a ranked batch holds list_size ({list_size} >= 2) completions per prompt; got {rows} rows")
    if adaptive_step_reward:
        if average_logps or ld_alpha is not None:
            raise ValueError("the adaptive step reward is a score of its own (step means); it takes neither "
                             "average_logps nor ld_alpha")
        policy_scores, ref_scores = _adaptive_step_scores(policy, reference, batch, spec, list_size)
    else:
        policy_scores, ref_scores, _ = _policy_and_reference_scores(policy, reference, batch, spec, average_logps,
                                                                    ld_alpha)
    per_prompt = policy_scores.view(list_size, -1).T  # (B, K)
    ref = None if ref_scores is None else ref_scores.view(list_size, -1).T
    per_example = spec.fn(per_prompt, ref, beta=beta, scores=scores, **options)
    metrics = losses.preference_metrics(per_prompt[:, 0], per_prompt[:, -1], None if ref is None else ref[:, 0],
                                        None if ref is None else ref[:, -1], beta=beta)
    return per_example.mean(), metrics
