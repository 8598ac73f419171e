"""Unpaired / binary-feedback losses: each example is only "desirable" or "undesirable".

Same call as the pairwise losses, but the chosen and rejected tensors need not have the same
length (and either may be ``None`` when a batch has no example of that kind)::

    fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, **options)

The result concatenates the desirable examples' losses, then the undesirable ones',
shape (n_chosen + n_rejected,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffalign.losses._common import as_weights, logratios, require_reference
from diffalign.losses.registry import UNPAIRED, register

Tensor = torch.Tensor


def _side(name: str, policy: Tensor | None, reference: Tensor | None) -> Tensor | None:
    if policy is None:
        return None
    require_reference(name, reference)
    return logratios(policy, reference)


def _concat(chosen: Tensor | None, rejected: Tensor | None) -> Tensor:
    parts = [t for t in (chosen, rejected) if t is not None]
    if not parts:
        raise ValueError("an unpaired loss needs at least one chosen or one rejected example")
    return torch.cat(parts)


def kto_kl_baseline(
    policy_kl: Tensor | None = None,
    ref_kl: Tensor | None = None,
    fallback: list[Tensor] | None = None,
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KTO's reference point z_0 = max(0, E[log pi_theta(y'|x) - log pi_ref(y'|x)]), detached.

    The paper (Section 4.1) estimates it on mismatched pairs (x, y') of the batch: pass their
    scores as ``policy_kl``/``ref_kl``. Without them the log-ratios of the batch's own
    examples (``fallback``) give the estimate, a cheaper and biased-upward stand-in.
    ``mean_over_processes`` averages the estimate over data-parallel processes before the clamp,
    as TRL's KTOTrainer and Diffusion-KTO's code gather it, so z_0 is the global batch's.
    """
    if policy_kl is not None:
        if ref_kl is None:
            raise ValueError("KTO's KL baseline needs ref_kl together with policy_kl")
        estimate = logratios(policy_kl, ref_kl).mean()
    else:
        estimate = torch.cat([t.flatten() for t in (fallback or []) if t is not None]).mean()
    estimate = estimate.detach()
    if mean_over_processes is not None:
        estimate = mean_over_processes(estimate)
    return estimate.clamp(min=0.0)


@register(
    "kto",
    kind=UNPAIRED,
    summary="KTO: prospect-theoretic value of each desirable/undesirable example vs a KL baseline",
    paper="Ethayarajh et al. 2024 (KTO), arXiv 2402.01306, Eq. 8",
)
def kto(
    pc: Tensor | None,
    pr: Tensor | None,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    kl: Tensor | float | None = None,
    policy_kl: Tensor | None = None,
    ref_kl: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Eq. 8): ``lambda_D (1 - sigma(beta (r_w - z_0)))`` for desirable examples and
    ``lambda_U (1 - sigma(beta (z_0 - r_l)))`` for undesirable ones.

    ``kl`` sets z_0 directly; otherwise see :func:`kto_kl_baseline`.
    """
    rw, rl = _side("kto", pc, rc), _side("kto", pr, rr)
    if kl is None:
        z0 = kto_kl_baseline(policy_kl, ref_kl, fallback=[rw, rl])
    else:
        z0 = torch.as_tensor(kl, dtype=torch.float32)
    chosen = None if rw is None else desirable_weight * (1 - torch.sigmoid(beta * (rw - z0.to(rw))))
    rejected = None if rl is None else undesirable_weight * (1 - torch.sigmoid(beta * (z0.to(rl) - rl)))
    return _concat(chosen, rejected)


@register(
    "apo_zero_unpaired",
    kind=UNPAIRED,
    summary="APO-zero on unpaired examples: each desirable likelihood up, each undesirable one down",
    paper="D'Oosterlinck et al. 2024 (APO), arXiv 2408.06266, Eq. 7 (its terms apart, as TRL's KTOTrainer)",
)
def apo_zero_unpaired(
    pc: Tensor | None,
    pr: Tensor | None,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """APO-zero's two terms (Eq. 7) on their own examples: ``lambda_D (1 - sigma(beta r_w))`` for
    desirable and ``lambda_U sigma(beta r_l)`` for undesirable ones; no reference point. For data
    whose desirable answers are better than the model's own (APO's "zero" case)."""
    rw, rl = _side("apo_zero_unpaired", pc, rc), _side("apo_zero_unpaired", pr, rr)
    chosen = None if rw is None else desirable_weight * (1 - torch.sigmoid(beta * rw))
    rejected = None if rl is None else undesirable_weight * torch.sigmoid(beta * rl)
    return _concat(chosen, rejected)


class RewardShift:
    """BCO's reward shift delta: the running mean of all implicit rewards seen so far.

    Call :meth:`update` with each batch's rewards (``beta * r`` of chosen and rejected,
    gathered over processes) before computing the loss; read :attr:`value`. A batch with a
    non-finite reward leaves the mean as it was (its step is one a trainer skips). The mean and
    count stay on the rewards' device, so a training step never waits for the GPU to read them;
    :meth:`state_dict` reads them, as two numbers, when a checkpoint is saved.
    """

    def __init__(self) -> None:
        self._mean = torch.zeros((), dtype=torch.float32)
        self._count = torch.zeros((), dtype=torch.long)

    def update(self, rewards: Tensor) -> Tensor:
        """Fold one batch's rewards into the running mean and return it (a 0-d tensor)."""
        rewards = rewards.detach().float().flatten()
        mean, count = self._mean.to(rewards.device), self._count.to(rewards.device)
        if rewards.numel():
            finite = rewards.isfinite().all()
            total = count + rewards.numel()
            mean = torch.where(finite, mean + (rewards.mean() - mean) * (rewards.numel() / total), mean)
            count = torch.where(finite, total, count)
        self._mean, self._count = mean, count
        return mean

    @property
    def value(self) -> Tensor:
        return self._mean

    @property
    def count(self) -> int:
        return int(self._count)

    def state_dict(self) -> dict[str, float]:
        return {"mean": float(self._mean), "count": int(self._count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._mean = torch.tensor(float(state["mean"]), dtype=torch.float32)
        self._count = torch.tensor(int(state["count"]), dtype=torch.long)


def udm_weights(
    prob_desirable: Tensor, min_ratio: float = 0.5, max_ratio: float = 10.0
) -> Tensor:
    """BCO's underlying-distribution-matching weights for undesirable examples (Section 3.3).

    A classifier on prompt embeddings predicts ``p = P(desirable | x)``; the density ratio
    ``p / (1 - p)``, clipped to [min_ratio, max_ratio] (TRL's defaults 0.5 and 10), reweights
    each undesirable example towards the prompt distribution of the desirable ones.
    """
    p = prob_desirable.float().clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).clamp(min_ratio, max_ratio)


@register(
    "bco",
    kind=UNPAIRED,
    summary="BCO: binary classifier on implicit rewards with reward shift and UDM weights",
    paper="Jung et al. 2024 (BCO), arXiv 2404.04656, Eq. 6 and Section 3.3",
)
def bco(
    pc: Tensor | None,
    pr: Tensor | None,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    delta: float = 0.0,
    rejected_weights: Tensor | None = None,
) -> Tensor:
    """``-log sigma(beta r_w - delta)`` for desirable and ``-w log sigma(-(beta r_l - delta))``
    for undesirable examples; delta from :class:`RewardShift`, w from :func:`udm_weights`.
    """
    rw, rl = _side("bco", pc, rc), _side("bco", pr, rr)
    chosen = None if rw is None else -F.logsigmoid(beta * rw - delta)
    rejected = None
    if rl is not None:
        rejected = as_weights(rejected_weights, rl) * -F.logsigmoid(-(beta * rl - delta))
    return _concat(chosen, rejected)


@register(
    "npo",
    kind=UNPAIRED,
    summary="NPO: push the likelihood of undesirable (forget) examples below the reference, bounded",
    paper="Zhang et al. 2024 (NPO), arXiv 2404.05868, Eq. 3",
)
def npo(
    pc: Tensor | None,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor,
    *,
    beta: float,
    retain_weight: float = 0.0,
) -> Tensor:
    """NPO (Eq. 3): ``(2/beta) log(1 + (pi_theta/pi_ref)^beta) = -(2/beta) log sigma(-beta r_l)``.

    Only the undesirable examples enter the NPO term. With ``retain_weight > 0`` the chosen
    examples add ``retain_weight * (-log pi_theta(y_w))`` (the paper's NPO+RT variant);
    otherwise the chosen tensors are ignored and may be None.
    """
    rl = _side("npo", pr, rr)
    if rl is None:
        raise ValueError("NPO needs the undesirable (rejected) examples' scores")
    forget = -(2.0 / beta) * F.logsigmoid(-beta * rl)
    retain = -retain_weight * logratios(pc, None) if retain_weight and pc is not None else None
    return _concat(retain, forget)
