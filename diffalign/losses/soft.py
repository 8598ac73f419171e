"""Soft-label pairwise losses: the preference is a probability, not a 0/1 label.

Same call as the pairwise losses plus ``preference``: per-example P(chosen is better), e.g.
averaged reward-model preference probabilities or the fraction of annotators (Pick-a-Pic
ties are 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses._common import logratios, require_reference, soft_logistic
from diffalign.losses.registry import SOFT_LABEL, register

Tensor = torch.Tensor


def _delta(name: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    require_reference(name, rc, rr)
    return logratios(pc, rc) - logratios(pr, rr)


@register(
    "soft_dpo",
    kind=SOFT_LABEL,
    summary="DPO against a soft label p: -(p log sigma(beta Delta) + (1-p) log sigma(-beta Delta))",
    paper="Bradley-Terry cross-entropy with soft targets; Rafailov et al. 2023 Eq. 7 generalised",
)
def soft_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, preference: Tensor | float) -> Tensor:
    """Cross-entropy between the Bradley-Terry probability sigma(beta Delta) and p.

    p = 1 is DPO; p = 1 - eps is cDPO; p = 0.5 pulls the implicit margin towards zero.
    """
    return soft_logistic(beta * _delta("soft_dpo", pc, pr, rc, rr), preference)


@register(
    "smpo",
    kind=SOFT_LABEL,
    summary="SmPO: DPO with the margin scaled by (2p - gamma), p a smoothed preference",
    paper="Lu et al. 2025 (SmPO-Diffusion), arXiv 2506.02698, Eq. 9",
)
def smpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    preference: Tensor | float,
    gamma: float = 1.0,
) -> Tensor:
    """``-log sigma((2p - gamma) beta Delta)`` (Eq. 9).

    Smoothing the winner/loser densities as p(x_w)^p p(x_l)^(gamma-p) (Eq. 8) scales the DPO
    margin by (2p - gamma): p = 1, gamma = 1 is DPO, and p = gamma/2 (equal preference) makes
    the loss the constant log 2, so near-ties stop pushing the model.
    """
    delta = _delta("smpo", pc, pr, rc, rr)
    p = torch.as_tensor(preference, dtype=delta.dtype, device=delta.device)
    return soft_logistic((2 * p - gamma) * beta * delta, 1.0)


TIE = 0.5  # the preference of a tied pair (Pick-a-Pic's 0.5/0.5 rows, the labelling page's 0)


@register(
    "bt_wide_ties",
    kind=SOFT_LABEL,
    summary="SoliReward's Bradley-Terry with wide ties: a win needs beta Delta > margin, a tie |beta Delta| < margin",
    paper="Lian et al. 2025 (SoliReward), arXiv 2512.22170, the BT-WT loss (the authors' trainer/loss.py); "
          "margin 3 as their training script",
)
def bt_wide_ties(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, preference: Tensor | float,
                 margin: float = 3.0) -> Tensor:
    """With d = beta Delta: ``-log sigma(d - margin)`` for a decided pair, and for a tie (preference 0.5)
    ``-log sigma(d - margin) - log sigma(-d - margin)``.

    A tie is not dropped: it holds the two implicit rewards within about ``margin`` of each other
    (the loss is nearly flat there and rises outside, on either side), so equally good images stay
    close instead of one being pushed up. A decided pair must win by the margin. The authors train a
    reward model with it (their d is the reward difference); here d is the implicit reward difference,
    as DPO reads a reward-model loss. Preferences other than 1 and 0.5 are decided pairs.
    """
    d = beta * _delta("bt_wide_ties", pc, pr, rc, rr)
    tie = torch.as_tensor(preference, dtype=d.dtype, device=d.device) == TIE
    win = -F.logsigmoid(d - margin)
    return torch.where(tie, win - F.logsigmoid(-d - margin), win)
