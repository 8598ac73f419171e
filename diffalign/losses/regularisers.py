"""Regularisers to add beside any preference loss.

``sft`` follows the pairwise signature (references and beta are ignored) so that it can be
mixed with any pairwise loss by :func:`diffalign.losses.combine`; ``z_loss`` works on LM logits.
"""

from __future__ import annotations

import torch

from diffalign.losses._common import f32, logratios, per_length
from diffalign.losses.registry import REGULARISER, register

Tensor = torch.Tensor


@register(
    "sft",
    kind=REGULARISER,
    needs_reference=False,
    summary="NLL of the chosen response (per token when lengths are given): the SFT term",
    paper="the RPO/CPO/ORPO NLL term; TRL loss_type 'sft'",
)
def sft(
    pc: Tensor,
    pr: Tensor | None = None,
    rc: Tensor | None = None,
    rr: Tensor | None = None,
    *,
    beta: float = 1.0,
    chosen_lengths: Tensor | None = None,
) -> Tensor:
    """``-log pi_theta(y_w|x) / |y_w|``; for a diffusion score, the chosen's denoising error."""
    return -per_length(logratios(pc, None), chosen_lengths)


@register(
    "z_loss",
    kind=REGULARISER,
    needs_reference=False,
    summary="z-loss: (log Z)^2 of LM logits, keeps the softmax normaliser near 1",
    paper="Chowdhery et al. 2022 (PaLM), arXiv 2204.02311, Section 5",
)
def z_loss(logits: Tensor, mask: Tensor | None = None, *, weight: float = 1e-4) -> Tensor:
    """``weight * mean_t (logsumexp(logits_t))^2`` per sequence; logits (B, T, V), mask (B, T)."""
    log_z = torch.logsumexp(f32(logits), dim=-1) ** 2
    if mask is None:
        return weight * log_z.mean(dim=-1)
    mask = mask.to(log_z.dtype)
    return weight * (log_z * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
