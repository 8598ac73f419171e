"""Token-level preference losses: per-token log-ratios and KL terms of a chosen and a rejected completion.

Signature::

    fn(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl, *, beta, chosen_mask, rejected_mask,
       **inputs_and_options) -> Tensor[B]

Each tensor is (B, T): for token t of a completion, ``logratios`` is ``log pi_theta(y_t | x, y_<t) -
log pi_ref(y_t | x, y_<t)`` and ``kl`` is ``sum_v pi_ref(v | x, y_<t) (log pi_theta(v | ...) - log pi_ref(v | ...))``,
the negative per-token KL(pi_ref || pi_theta) (TDPO's sequential KL, which SparsePO masks); ``*_mask`` marks the
completion's tokens (1) against prompt and padding (0). :class:`diffalign.objectives.lm_sparse_po` computes them
from a causal LM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses._common import f32
from diffalign.losses.registry import TOKEN_LEVEL, register

Tensor = torch.Tensor


def _masked_sum(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """(B,) sum over the completion tokens of ``values`` (each times its weight)."""
    values = f32(values) * f32(mask)
    return (values if weights is None else values * f32(weights)).sum(dim=-1)


@register(
    "sparse_po",
    kind=TOKEN_LEVEL,
    summary="SparsePO: DPO on token log-ratios and token KLs each weighted by a learned sparse mask, L1 on the masks",
    paper="Christopoulou et al. 2024 (SparsePO), arXiv 2410.05102, the objective of the authors' sparse_trainer.py "
          "(huawei-noah/HEBO SparsePO); TDPO's token KL (Zeng et al. 2024, arXiv 2404.11999)",
)
def sparse_po(chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_kl: Tensor, rejected_kl: Tensor, *,
              beta: float, chosen_mask: Tensor, rejected_mask: Tensor, chosen_reward_mask: Tensor,
              rejected_reward_mask: Tensor, chosen_kl_mask: Tensor, rejected_kl_mask: Tensor,
              l1_reward: float = 0.0, l1_kl: float = 0.0) -> Tensor:
    """``-log sigma(beta (u - d)) + l1_reward (|m^u_w|_1 + |m^u_l|_1) + l1_kl (|m^d_w|_1 + |m^d_l|_1)``.

    ``u = sum_t m^u_w,t r_w,t - sum_t m^u_l,t r_l,t`` is the DPO margin with each token's log-ratio weighted by
    its reward mask, ``d = sum_t m^d_w,t k_w,t - sum_t m^d_l,t k_l,t`` the same for the token KL terms: with all
    masks 1 this is TDPO1's loss, and with the KL masks 0 plain DPO. Masks near zero take a token out of the
    preference (or the KL), so the loss can weigh the few tokens that decide a preference. The masks come from
    a model the loss trains with the policy; their L1 norms over the completion tokens push them sparse
    (0 by default, as the authors' runs except HH, which used 0.001 with a mask shared by both terms; they halve
    each weight then, since the shared mask enters both norms).
    """
    u = (_masked_sum(chosen_logratios, chosen_mask, chosen_reward_mask)
         - _masked_sum(rejected_logratios, rejected_mask, rejected_reward_mask))
    d = _masked_sum(chosen_kl, chosen_mask, chosen_kl_mask) - _masked_sum(rejected_kl, rejected_mask, rejected_kl_mask)
    loss = -F.logsigmoid(beta * (u - d))
    if l1_reward:
        loss = loss + l1_reward * (_masked_sum(chosen_reward_mask.abs(), chosen_mask)
                                   + _masked_sum(rejected_reward_mask.abs(), rejected_mask))
    if l1_kl:
        loss = loss + l1_kl * (_masked_sum(chosen_kl_mask.abs(), chosen_mask)
                               + _masked_sum(rejected_kl_mask.abs(), rejected_mask))
    return loss
