"""Listwise / ranked losses over K candidates per prompt.

Signature::

    fn(policy, reference, *, beta, scores=None, **options) -> Tensor[B]

``policy`` and ``reference`` are scores of shape (B, K); ``reference`` may be None for a
reference-free use. Without ``scores`` the K items are taken as ranked best first; with
``scores`` (B, K), higher is better, they give the true ranking (and, where the loss uses
them, the gains). The implicit reward of item k is ``r_k = s_theta(k) - s_ref(k)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffalign.losses._common import f32, logratios
from diffalign.losses.registry import LISTWISE, register

Tensor = torch.Tensor


def _rewards(policy: Tensor, reference: Tensor | None) -> Tensor:
    if policy.dim() != 2:
        raise ValueError(f"listwise losses take (batch, list) scores, got shape {tuple(policy.shape)}")
    return logratios(policy, reference)


def _true_scores(r: Tensor, scores: Tensor | None) -> Tensor:
    """Relevance per item: ``scores`` when given, else K-1, ..., 0 for a best-first list."""
    if scores is not None:
        return f32(scores).to(r.device)
    k = r.shape[1]
    return torch.arange(k - 1, -1, -1, dtype=r.dtype, device=r.device).expand_as(r)


def _better_pairs(truth: Tensor) -> Tensor:
    """(B, K, K) mask of ordered pairs (i, j) where item i is strictly better than item j."""
    return truth.unsqueeze(2) > truth.unsqueeze(1)


def _pairwise_logistic(r: Tensor, beta: float) -> Tensor:
    """(B, K, K) DPO loss of every ordered pair: -log sigma(beta (r_i - r_j))."""
    return -F.logsigmoid(beta * (r.unsqueeze(2) - r.unsqueeze(1)))


@register(
    "plackett_luce",
    kind=LISTWISE,
    summary="DPO under the Plackett-Luce model: likelihood of the whole ranking",
    paper="Rafailov et al. 2023 (DPO), arXiv 2305.18290, Eq. 19 (Appendix A.3)",
)
def plackett_luce(policy: Tensor, reference: Tensor | None, *, beta: float, scores: Tensor | None = None) -> Tensor:
    """``-sum_k [beta r_(k) - logsumexp_{j >= k} beta r_(j)]`` over the ranking (k = best first)."""
    r = _rewards(policy, reference)
    if scores is not None:
        order = torch.argsort(_true_scores(r, scores), dim=1, descending=True)
        r = torch.gather(r, 1, order)
    z = beta * r
    # logsumexp over the suffix j >= k: reverse, cumulative logsumexp, reverse back
    suffix = torch.logcumsumexp(z.flip(1), dim=1).flip(1)
    return -(z - suffix)[:, :-1].sum(dim=1)


def dcg_pair_weights(rewards: Tensor, truth: Tensor) -> Tensor:
    """LambdaRank's |Delta DCG_ij| = |G_i - G_j| * |1/D(pi_i) - 1/D(pi_j)| (RankDPO Eq. 6).

    G = 2^truth - 1 are gains from the true relevance, pi the rank (1 = top) of each item
    under the model's *current* implicit rewards, D(pi) = log2(1 + pi). Detached: weights
    steer the gradient, they do not receive it.
    """
    rewards, truth = rewards.detach(), truth.detach()
    gains = torch.pow(2.0, truth) - 1.0
    predicted_rank = torch.argsort(torch.argsort(rewards, dim=1, descending=True), dim=1) + 1
    discount = 1.0 / torch.log2(1.0 + predicted_rank.to(rewards.dtype))
    return (gains.unsqueeze(2) - gains.unsqueeze(1)).abs() * (discount.unsqueeze(2) - discount.unsqueeze(1)).abs()


@register(
    "lambda_dpo",
    kind=LISTWISE,
    summary="RankDPO / LiPO-lambda: pairwise DPO over all pairs of a list, weighted by Delta DCG",
    paper="Karthik et al. 2024 (RankDPO), arXiv 2410.18013, Eq. 5-7; Liu et al. 2024 (LiPO) Eq. 11",
)
def lambda_dpo(policy: Tensor, reference: Tensor | None, *, beta: float, scores: Tensor | None = None) -> Tensor:
    """``sum_{i better than j} |Delta DCG_ij| * -log sigma(beta (r_i - r_j))`` per list.

    Gains come from ``scores`` (e.g. averaged reward-model scores of Syn-Pic); without them,
    from the best-first position (relevance K-1, ..., 0). Unnormalised, as in the paper.
    """
    r = _rewards(policy, reference)
    truth = _true_scores(r, scores)
    weights = dcg_pair_weights(r, truth) * _better_pairs(truth)
    return (weights * _pairwise_logistic(r, beta)).sum(dim=(1, 2))


@register(
    "tpo",
    kind=LISTWISE,
    summary="TPO preference-list ranking: DPO over every strictly ordered pair, averaged",
    paper="Liao et al. 2024 (TPO), arXiv 2410.12854, Eq. 9",
)
def tpo(policy: Tensor, reference: Tensor | None, *, beta: float, scores: Tensor | None = None) -> Tensor:
    """Mean over the K(K-1) ordered pairs of ``[s_i > s_j] * -log sigma(beta (r_i - r_j))``.

    Departs from the authors' code, which also counts tied pairs (as log 2) and wraps the
    averaged pair loss in a second log-sigmoid; the Adaptive Step Reward is an LM-specific
    rescaling of r upstream of this loss and is not part of it.
    """
    r = _rewards(policy, reference)
    k = r.shape[1]
    pairs = _better_pairs(_true_scores(r, scores))
    return (pairs * _pairwise_logistic(r, beta)).sum(dim=(1, 2)) / (k * (k - 1))


@register(
    "adpo",
    kind=LISTWISE,
    summary="Anchored DPO: KL(q || softmax(beta (s_theta - s_ref))) over the list, soft targets q",
    paper="Wang 2025 (ADPO), arXiv 2510.18913, Eq. 3 (listwise anchored objective)",
)
def adpo(
    policy: Tensor,
    reference: Tensor | None,
    *,
    beta: float,
    scores: Tensor | None = None,
    target: Tensor | None = None,
    target_temperature: float = 1.0,
) -> Tensor:
    """``KL(q || softmax(beta * r))``: anchored listwise soft-DPO (beta = 1/tau_anc).

    q is ``target`` (B, K) when given, else ``softmax(scores / target_temperature)``, else
    one-hot on the first (best) item, which reduces to the top-1-vs-rest anchored loss.
    """
    r = _rewards(policy, reference)
    if target is None:
        if scores is not None:
            target = torch.softmax(f32(scores) / target_temperature, dim=1)
        else:
            target = F.one_hot(torch.zeros(r.shape[0], dtype=torch.long, device=r.device), r.shape[1]).to(r.dtype)
    target = f32(target).to(r.device)
    log_model = torch.log_softmax(beta * r, dim=1)
    return (torch.xlogy(target, target) - target * log_model).sum(dim=1)


@register(
    "irpo",
    kind=LISTWISE,
    summary="IRPO: each item's reward against the mean exp-reward of the rest, weighted by its gain over its list position",
    paper="Wu et al. 2025 (In-context Ranking Preference Optimization), arXiv 2504.15477, the listwise objective "
          "with positional aggregation (the authors' rdpo_loss in trainers.py, default weights)",
)
def irpo(policy: Tensor, reference: Tensor | None, *, beta: float, scores: Tensor | None = None) -> Tensor:
    """``-mean_i w_i log sigma(-log[(1/(K-1)) sum_{j != i} exp(beta (r_j - r_i))])``, w_i = (2^y_i - 1) / log2(1 + i).

    Each item is compared with the average of the others in one soft-max-like term, and the terms are
    aggregated with NDCG's weights: the gain ``2^y - 1`` of the item's graded relevance y and the discount of
    its position i in the list (1 = first). In the paper the list is the model's own in-context ranking and
    the positions are where it placed each item; for a dataset of ranked lists they are the order in which
    the row lists the items (best first when no ``scores`` are given, relevance K-1, ..., 0). Relevance must
    be >= 0 (graded labels, as the paper's); the least relevant item (y = 0) carries no weight. The item's
    own term is left out of the sum exactly (the authors subtract 100 before beta, which leaves a residue of
    exp(-100 beta)).
    """
    r = _rewards(policy, reference)
    truth = _true_scores(r, scores)
    k = r.shape[1]
    if k < 2:
        raise ValueError("irpo compares each item with the rest of its list: lists need at least 2 items")
    if (truth < 0).any():
        raise ValueError("irpo's gains 2^y - 1 need graded relevance y >= 0; shift or rescale the scores")
    position = torch.arange(1, k + 1, dtype=r.dtype, device=r.device)
    weights = (torch.pow(2.0, truth) - 1.0) / torch.log2(1.0 + position)
    others = beta * (r.unsqueeze(1) - r.unsqueeze(2))  # [b, i, j] = beta (r_j - r_i)
    others = others.masked_fill(torch.eye(k, dtype=torch.bool, device=r.device), float("-inf"))
    log_mean = torch.logsumexp(others, dim=2) - math.log(k - 1)
    return -(weights * F.logsigmoid(-log_mean)).mean(dim=1)
