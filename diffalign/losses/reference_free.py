"""Reference-free pairwise losses: only the policy's scores matter.

Same call as the pairwise losses; the references are accepted and ignored, so ``None`` is
fine. SimPO, ORPO and ASFT are defined on per-token *average* log-probabilities: pass
averages, or sums with ``chosen_lengths``/``rejected_lengths``. ORPO and ASFT read the score
as a probability (exp of the average log-prob), so their scores must be <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses._common import log1mexp, logratios, per_length, soft_logistic
from diffalign.losses.registry import REFERENCE_FREE, register

Tensor = torch.Tensor


def _averaged(pc: Tensor, pr: Tensor, chosen_lengths, rejected_lengths) -> tuple[Tensor, Tensor]:
    return per_length(logratios(pc, None), chosen_lengths), per_length(logratios(pr, None), rejected_lengths)


def _nll(chosen_avg: Tensor, weight: float) -> Tensor | float:
    return -weight * chosen_avg if weight else 0.0


@register(
    "simpo",
    kind=REFERENCE_FREE,
    needs_reference=False,
    summary="SimPO: length-normalised log-prob margin must exceed gamma, no reference",
    paper="Meng et al. 2024 (SimPO), arXiv 2405.14734, Eq. 6",
)
def simpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None = None,
    rr: Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """``-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)`` (Eq. 6).

    Matches TRL's CPO trainer with ``loss_type='simpo'`` and ``simpo_gamma = gamma``.
    """
    cw, cl = _averaged(pc, pr, chosen_lengths, rejected_lengths)
    return soft_logistic(beta * (cw - cl) - gamma, 1.0 - label_smoothing)


@register(
    "cpo",
    kind=REFERENCE_FREE,
    needs_reference=False,
    summary="CPO: DPO without the reference plus an NLL term on the chosen",
    paper="Xu et al. 2024 (CPO), arXiv 2401.08417, Eq. 3 and 4",
)
def cpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None = None,
    rr: Tensor | None = None,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
) -> Tensor:
    """``-log sigma(beta (log pi(y_w) - log pi(y_l))) - nll_weight * log pi(y_w)/|y_w|``."""
    cw, cl = logratios(pc, None), logratios(pr, None)
    return soft_logistic(beta * (cw - cl), 1.0 - label_smoothing) + _nll(per_length(cw, chosen_lengths), nll_weight)


def log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp), avg_logp < 0."""
    return avg_logp - log1mexp(avg_logp)


@register(
    "orpo",
    kind=REFERENCE_FREE,
    needs_reference=False,
    summary="ORPO: NLL on the chosen plus lambda times an odds-ratio preference term",
    paper="Hong et al. 2024 (ORPO), arXiv 2403.07691, Eq. 6-7",
)
def orpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None = None,
    rr: Tensor | None = None,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """``-log P(y_w) - beta * log sigma(log odds(y_w) - log odds(y_l))`` (lambda = beta).

    P is the per-token average likelihood, as in the paper and TRL's ORPO trainer.
    """
    cw, cl = _averaged(pc, pr, chosen_lengths, rejected_lengths)
    return -beta * F.logsigmoid(log_odds(cw) - log_odds(cl)) + _nll(cw, nll_weight)


@register(
    "asft",
    kind=REFERENCE_FREE,
    needs_reference=False,
    summary="ASFT: NLL plus binary cross-entropy on the absolute likelihood of each response",
    paper="Wang et al. 2024 (ASFT), arXiv 2409.10571, Eq. 8-9",
)
def asft(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None = None,
    rr: Tensor | None = None,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """``-log P(y_w) - beta [log sigma(log odds(y_w)) + log sigma(-log odds(y_l))]``.

    sigma(log odds(y)) = P(y), so the alignment term is ``-log P(y_w) - log(1 - P(y_l))``:
    each response's own likelihood is pushed towards 1 or 0, with no pairwise comparison.
    """
    cw, cl = _averaged(pc, pr, chosen_lengths, rejected_lengths)
    align = -F.logsigmoid(log_odds(cw)) - F.logsigmoid(-log_odds(cl))
    return beta * align + _nll(cw, nll_weight)
