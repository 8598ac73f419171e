"""Unpaired preference losses on a text LM: each completion is only desirable or not (KTO, BCO, NPO).

A batch holds B prompt-completion rows (``input_ids``, ``attention_mask``, ``completion_mask``,
right-padded) and ``labels`` (B,), true for a desirable completion; the two kinds need not be
balanced or paired. This is the LM counterpart of Diffusion-KTO's per-image labels: the same core
losses of :mod:`diffalign.losses` score both families.

KTO's reference point z_0 (Ethayarajh et al. 2024, arXiv 2402.01306, Sec. 4.1) is estimated on
mismatched pairs: prompt i with completion i-1 of the batch (:func:`mismatched_completions`, the
rotation TRL's ``KTOTrainer`` uses), scored under policy and reference without gradients. Without
such a batch the rows' own log-ratios give the estimate, as on diffusion. BCO (Jung et al. 2024,
arXiv 2404.04656, Sec. 3.2) shifts its rewards by the running mean that a :class:`RewardShift`
keeps. Both statistics are means over the global batch when ``mean_over_processes`` is given
(e.g. ``lambda v: accelerator.reduce(v.reshape(1), "mean")[0]``), as TRL gathers them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from diffalign import losses
from diffalign.lm.preference import _policy_and_reference_scores
from diffalign.losses import RewardShift
from diffalign.losses._common import logratios
from diffalign.losses.registry import UNPAIRED
from diffalign.losses.unpaired import kto_kl_baseline

Tensor = torch.Tensor


def mismatched_completions(batch: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """KTO's KL batch: row i is prompt i followed by completion i-1 (row 0 takes the last completion).

    The prompt is a row's attended tokens outside its completion, the completion its masked tokens;
    rows come back right-padded with ``pad_token_id``. The same set of completions as the batch, each
    after another prompt, as TRL builds ``KL_input_ids`` (its ``add_kl_completion_ids``).
    """
    ids, attention, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    prompts = [ids[i][attention[i] & ~completion[i]] for i in range(len(ids))]
    answers = [ids[i][completion[i]] for i in range(len(ids))]
    rows = [torch.cat([prompt, answers[i - 1]]) for i, prompt in enumerate(prompts)]
    masks = [torch.cat([torch.zeros_like(prompt), torch.ones_like(answers[i - 1])]) for i, prompt in enumerate(prompts)]
    return {
        "input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(row) for row in rows], batch_first=True),
        "completion_mask": pad_sequence(masks, batch_first=True),
    }


def unpaired_preference_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict[str, Tensor],
    *,
    labels: Tensor,
    loss: str = "kto",
    beta: float = 0.1,
    kl_batch: dict[str, Tensor] | None = None,
    reward_shift: RewardShift | None = None,
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
    average_logps: bool = False,
    ld_alpha: float | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean unpaired loss over the batch's completions (desirable ones first, as the core loss orders them)
    and metrics: the mean implicit reward and log-prob of each kind, KTO's ``kl`` or BCO's ``delta``.

    ``kl_batch`` (see :func:`mismatched_completions`) gives KTO's reference point; an explicit
    ``kl=`` option fixes it instead. ``reward_shift`` is BCO's running mean, updated with this batch.
    """
    spec = losses.spec(loss)
    if spec.kind != UNPAIRED:
        raise ValueError(f"{loss!r} is a {spec.kind} loss: use preference_loss or ranked_preference_loss")
    labels = torch.as_tensor(labels, device=batch["input_ids"].device).bool()
    if labels.shape != (len(batch["input_ids"]),):
        raise ValueError(f"labels must hold one flag per row: got shape {tuple(labels.shape)} for "
                         f"{len(batch['input_ids'])} rows")
    scores, ref_scores, _ = _policy_and_reference_scores(policy, reference, batch, spec, average_logps, ld_alpha)
    metrics: dict[str, Tensor] = {}
    if spec.name == "kto" and "kl" not in options:
        policy_kl = ref_kl = None
        if kl_batch is not None:
            with torch.no_grad():
                policy_kl, ref_kl, _ = _policy_and_reference_scores(policy, reference, kl_batch, spec,
                                                                    average_logps, ld_alpha)
        options["kl"] = metrics["kl"] = kto_kl_baseline(policy_kl, ref_kl, fallback=[logratios(scores, ref_scores)],
                                                        mean_over_processes=mean_over_processes)
    if spec.name == "bco" and reward_shift is not None and "delta" not in options:
        mean_reward = beta * logratios(scores, ref_scores).detach().mean()
        if mean_over_processes is not None:
            mean_reward = mean_over_processes(mean_reward)
        options["delta"] = metrics["delta"] = reward_shift.update(mean_reward[None])

    def side(values: Tensor | None, wanted: Tensor) -> Tensor | None:  # an empty side is None for the core loss
        return None if values is None or not bool(wanted.any()) else values[wanted]

    pc, pr, rc, rr = side(scores, labels), side(scores, ~labels), side(ref_scores, labels), side(ref_scores, ~labels)
    per_example = spec.fn(pc, pr, rc, rr, beta=beta, **options)
    for kind, policy_side, ref_side in (("chosen", pc, rc), ("rejected", pr, rr)):
        if policy_side is not None:
            metrics[f"logps/{kind}"] = policy_side.detach().mean()
            if ref_side is not None:
                metrics[f"rewards/{kind}"] = beta * logratios(policy_side, ref_side).detach().mean()
    return per_example.mean(), metrics
