"""LCPO (Latent Collective Preference Optimization, published as RE-PO): any pairwise loss made robust to
flipped labels by expectation-maximisation over whether each label is correct.

Cao et al. 2025, arXiv 2509.24159. A pairwise loss L defines a preference model through
P(y_w beats y_l) = exp(-L(w, l)) / (exp(-L(w, l)) + exp(-L(l, w))) (for DPO, sigma(beta Delta)). With
a latent z_i = 1 when pair i's label is right and a reliability eta = P(z = 1):

- E-step: the posterior that the label is right, w_i = eta p_i / (eta p_i + (1 - eta)(1 - p_i)), under
  the current policy (detached);
- M-step for the policy: minimise the expected complete-data loss w_i L(w, l) + (1 - w_i) L(l, w), the
  pair counted as labelled with weight w_i and as flipped with weight 1 - w_i;
- M-step for eta: the mean posterior over the data.

With w_i held at 1 - eps this is cDPO; LCPO lets each pair's eps follow the model's own confidence, and
eta follow the data's noise. For DPO the gradient in Delta is -beta (w_i - p_i), and w_i's odds are p_i's
times eta / (1 - eta): a pair is pushed towards its label about as hard as DPO pushes it while the model
agrees with it, and hardly at all once the model finds the label very unlikely. Full-batch EM is not practical in a training run: :class:`LabelReliability`
keeps eta as an exponential moving average of each step's mean posterior (over every process), saved
with the checkpoints so a resumed run continues exactly.
"""

from __future__ import annotations

import torch

from diffalign.losses.registry import PAIRWISE, register, spec

Tensor = torch.Tensor
INITIAL_RELIABILITY = 0.9  # eta before any estimate: our choice, re-estimated as the run goes
RELIABILITY_MOMENTUM = 0.01  # weight of each step's mean posterior in the running eta


def label_posterior(loss: Tensor, flipped_loss: Tensor, reliability: Tensor | float) -> Tensor:
    """E-step: P(label right | pair), from the loss of the label as given and as flipped; detached."""
    loss, flipped_loss = loss.detach().float(), flipped_loss.detach().float()
    log_p = -loss - torch.logaddexp(-loss, -flipped_loss)  # log P(y_w beats y_l) under the loss's model
    log_not_p = -flipped_loss - torch.logaddexp(-loss, -flipped_loss)
    eta = torch.as_tensor(reliability, dtype=log_p.dtype, device=log_p.device).clamp(1e-6, 1 - 1e-6)
    right, wrong = torch.log(eta) + log_p, torch.log1p(-eta) + log_not_p
    return torch.exp(right - torch.logaddexp(right, wrong))


def _both_ways(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, beta: float,
               base: str) -> tuple[Tensor, Tensor]:
    """The wrapped loss of each pair as labelled and as flipped (its options at their defaults)."""
    base_spec = spec(base)
    if base_spec.kind != PAIRWISE or base == "lcpo":
        raise ValueError(f"lcpo wraps a pairwise loss; {base!r} is {base_spec.kind}")
    return base_spec.fn(pc, pr, rc, rr, beta=beta), base_spec.fn(pr, pc, rr, rc, beta=beta)


@register(
    "lcpo",
    kind=PAIRWISE,
    summary="LCPO: a pairwise loss weighted by the EM posterior that each label is right, the rest as flipped",
    paper="Cao et al. 2025 (Latent Collective Preference Optimization / RE-PO), arXiv 2509.24159, Section 3",
)
def lcpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, base: str = "dpo",
         reliability: Tensor | float = INITIAL_RELIABILITY) -> Tensor:
    """``w L(w, l) + (1 - w) L(l, w)``, w the detached posterior (:func:`label_posterior`) at ``reliability``.

    ``base`` names the wrapped pairwise loss (``dpo``, ``ipo``, ``hinge``, ...; its options at their
    defaults). A trainer passes the running reliability of :class:`LabelReliability`; a fixed
    ``reliability`` is the E-step alone.
    """
    loss, flipped = _both_ways(pc, pr, rc, rr, beta, base)
    weight = label_posterior(loss, flipped, reliability).to(loss.dtype)
    return weight * loss + (1 - weight) * flipped


def lcpo_posterior(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, *, beta: float,
                   reliability: Tensor | float, base: str = "dpo") -> Tensor:
    """(B,) E-step posteriors of a batch of pairs, for the reliability's M-step."""
    return label_posterior(*_both_ways(pc, pr, rc, rr, beta, base), reliability)


class LabelReliability:
    """LCPO's eta, the share of right labels, re-estimated over the run.

    :meth:`update` folds one step's mean posterior (already averaged over processes) into an exponential
    moving average; a non-finite mean (a step the trainer skips) leaves it as it was. The value stays on
    the device; :meth:`state_dict` reads it when a checkpoint is saved.
    """

    def __init__(self, initial: float = INITIAL_RELIABILITY, momentum: float = RELIABILITY_MOMENTUM) -> None:
        if not 0 < initial < 1:
            raise ValueError(f"the initial label reliability is a probability in (0, 1); got {initial}")
        self._value = torch.tensor(float(initial))
        self.momentum = momentum

    @property
    def value(self) -> Tensor:
        return self._value

    def update(self, mean_posterior: Tensor) -> Tensor:
        mean_posterior = mean_posterior.detach().float()
        value = self._value.to(mean_posterior.device)
        moved = value + self.momentum * (mean_posterior - value)
        self._value = torch.where(mean_posterior.isfinite(), moved, value)
        return self._value

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self._value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._value = torch.tensor(float(state["value"]))
