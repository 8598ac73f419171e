"""Metrics every preference objective logs, and weighted mixtures of pairwise losses."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from diffalign.losses._common import logratios
from diffalign.losses.registry import LISTWISE, LOGIT_KINDS, spec

Tensor = torch.Tensor


@torch.no_grad()
def preference_metrics(
    pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, *, beta: float
) -> dict[str, Tensor]:
    """Batch means of the implicit rewards ``beta * r`` and the implicit accuracy.

    Keys follow TRL's DPO logs; ``implicit_acc`` is what diffusers' DPO example logs (the
    fraction of pairs whose implicit reward ranks the chosen first; ties count one half).
    Values stay tensors: no host-device sync until the caller logs them.
    """
    chosen = beta * logratios(pc, rc)
    rejected = beta * logratios(pr, rr)
    margin = chosen - rejected
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": margin.mean(),
        "implicit_acc": (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean(),
    }


def combine(terms: Sequence[tuple[str, float] | tuple[str, float, dict[str, Any]]]) -> Callable[..., Tensor]:
    """A pairwise loss that is the weighted sum of registered pairwise-signature losses.

    ``combine([("dpo", 1.0), ("sft", 0.2)])`` gives DPO + 0.2 NLL (TRL's ``loss_type`` list
    with ``loss_weights``). Per-term options go in a third element; ``beta`` is shared.
    """
    resolved = []
    for term in terms:
        name, weight, options = (*term, {})[:3]
        if spec(name).kind in (LISTWISE, *LOGIT_KINDS) or name == "z_loss":
            raise ValueError(f"combine() mixes pairwise-signature losses; {name!r} has another signature")
        resolved.append((spec(name).fn, float(weight), dict(options)))

    def combined(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, *, beta: float) -> Tensor:
        return sum(w * fn(pc, pr, rc, rr, beta=beta, **opts) for fn, w, opts in resolved)

    return combined
