"""Sequence log-probabilities from a causal LM's logits: the text-LM likelihood proxy.

The score of a completion is the sum (or mean) over its tokens of log p(token | prefix),
with a mask marking completion tokens (prompt and padding are 0).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# How a completion's score can be formed, beside the plain sum: (keyword of preference_loss, what, paper).
# They change the likelihood proxy, not the loss, so any pairwise loss takes them; `diffalign losses` lists them.
SCORE_OPTIONS = (
    ("average_logps=True", "mean token log-prob instead of the sum (SimPO, ORPO scores)",
     "Meng et al. 2024 (SimPO), arXiv 2405.14734, Eq. 4"),
    ("ld_alpha=ALPHA", "LD-DPO: tokens past the shorter completion of a pair count with weight alpha",
     "Liu et al. 2024 (LD-DPO), arXiv 2409.06411, Eq. 9"),
)


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_t | x_<t) for t >= 1: shape (N, T-1), in float32.

    Computed as gather(logits) - logsumexp(logits) per position, which never materialises a
    full (N, T, V) log-softmax in float32 next to the logits.
    """
    logits = logits[:, :-1]
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = torch.gather(logits, -1, targets).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def sequence_logps(
    logits: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    average: bool = False,
    ld_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence completion log-probs and completion lengths.

    Args:
        logits: (N, T, V) causal-LM logits for ``input_ids`` (N, T).
        completion_mask: (N, T), 1 on completion tokens.
        average: divide by the completion length (SimPO, ORPO, IPO-style scores).
        ld_alpha: LD-DPO length desensitisation (Liu et al. 2024, arXiv 2409.06411, Eq. 9):
            the batch holds N/2 chosen then N/2 rejected sequences; tokens past the shorter
            completion of each pair count with weight alpha.

    Returns:
        (scores (N,), lengths (N,)) in float32.
    """
    return completion_scores(token_logps(logits, input_ids), completion_mask, average=average, ld_alpha=ld_alpha)


def completion_scores(per_token: Tensor, completion_mask: Tensor, *, average: bool = False,
                      ld_alpha: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence completion scores and lengths from per-token log-probs ``per_token`` (N, T-1), token t >= 1
    of each sequence; see :func:`sequence_logps`."""
    mask = completion_mask[:, 1:].to(per_token.dtype)
    lengths = mask.sum(dim=1)
    if ld_alpha is None:
        scores = (per_token * mask).sum(dim=1)
    else:
        scores = ld_scores(per_token, mask, ld_alpha)
    if average:
        scores = scores / lengths.clamp(min=1.0)
    return scores, lengths


def ld_scores(per_token: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """LD-DPO: sum over the first min(|y_w|, |y_l|) completion tokens + alpha * the rest."""
    if per_token.shape[0] % 2:
        raise ValueError("LD-DPO needs a chosen/rejected batch (an even number of sequences)")
    position = mask.cumsum(dim=1)  # 1-based index of each completion token
    chosen_len, rejected_len = mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    weight = torch.where(position <= shared, 1.0, alpha) * mask
    return (per_token * weight).sum(dim=1)
