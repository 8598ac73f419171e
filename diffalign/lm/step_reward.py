"""TPO's Adaptive Step Reward: a completion's score as a weighted mean of its reasoning steps' log-ratios.

TPO (Liao et al. 2024, "Aligning Large Language Models with Multi-branch & Multi-step Preference Trees",
arXiv 2410.12854) ranks K completions of a prompt whose text is split into steps ("Step 1: ...
Step 2: ..."). Instead of the summed token log-ratio, each completion's implicit reward is the mean over its
steps of the step's mean token log-ratio, each step weighted by how much it resembles the same step of the
best completion: ``w = 1 + cos(h_step, h_step of the best)``, ``h`` the mean last hidden state of the step's
tokens under the policy. Steps that share the best completion's meaning count up to twice, steps that
diverge from it count less, so the reward looks at where the completions differ in substance rather than in
wording. As the authors' ``loss.py`` (``compute_step_weights``, ``compute_weighted_logits``): the weights come
from the policy's hidden states and carry its gradient; tokens before the first step (step 0) do not count;
a completion with more steps than the shortest of its list has its last ones folded into the list's last
common step (``diffalign.lm.tokenize``). One departure: the authors gather token t's log-prob from the logits
at position t (the model's prediction of token t + 1); here it is log p(x_t | x_<t), as every diffalign score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _step_means(values: Tensor, step_index: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Per row, the mean of ``values`` (R, T[, D]) over each step's tokens, (R, steps + 1[, D]), and each step's
    token count (R, steps + 1); step 0 (not a step) is included and left to the caller."""
    one_hot = F.one_hot(step_index, steps + 1).to(values.dtype)  # (R, T, S + 1)
    counts = one_hot.sum(dim=1)
    if values.dim() == 2:
        sums = torch.einsum("rts,rt->rs", one_hot, values)
        return sums / counts.clamp(min=1), counts
    sums = torch.einsum("rts,rtd->rsd", one_hot, values)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def adaptive_step_weights(hidden: Tensor, step_index: Tensor, list_size: int) -> Tensor:
    """Each step's weight ``1 + cos(h_step, h_step of the list's best completion)``, (R, S + 1).

    ``hidden`` (R, T, D): the policy's last hidden states of the R = K * B rank-major rows (row k * B + i the k-th
    completion of prompt i, best first); ``step_index`` (R, T): each token's step, 0 outside any step. A step that
    the row or the best completion lacks weighs 0, as does step 0.
    """
    steps = int(step_index.max())
    means, counts = _step_means(hidden.float(), step_index, steps)
    rows = hidden.shape[0]
    best = means.view(list_size, rows // list_size, *means.shape[1:])[0].repeat(list_size, 1, 1)
    best_counts = counts.view(list_size, rows // list_size, -1)[0].repeat(list_size, 1)
    weights = (F.cosine_similarity(means, best, dim=-1) + 1) * ((counts > 0) & (best_counts > 0))
    return weights * (torch.arange(steps + 1, device=weights.device) > 0)


def step_weighted_scores(per_token: Tensor, step_index: Tensor, weights: Tensor) -> Tensor:
    """Each row's ``sum_s w_s * mean_{t in s} per_token_t / sum_s w_s`` (0 for a row with no weighted step).

    ``per_token`` (R, T - 1) holds log p(x_t | x_<t) for t >= 1 (:func:`diffalign.lm.logprobs.token_logps`), so it
    is read against ``step_index[:, 1:]``.
    """
    means, _ = _step_means(per_token.float(), step_index[:, 1:], weights.shape[1] - 1)
    total = weights.sum(dim=1)
    return torch.where(total > 0, (weights * means).sum(dim=1) / total.clamp(min=1e-12), torch.zeros_like(total))
