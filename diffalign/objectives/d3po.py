"""D3PO (Yang et al. 2023, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model", arXiv 2311.13231): DPO on the denoising MDP, through any pairwise core loss.

Two trajectories of one prompt start from the same noise; a person or a reward function says
which final image is better. Each denoising step is an action with the Gaussian policy
p_theta(x_{k+1} | x_k, c) (:mod:`diffalign.diffusion.logprob`), and the DPO loss is applied per
step k (Eq. 9, with the authors' clipping of the probability ratio to [1 - eps, 1 + eps]):

    L_k = -log sigma( beta * [ clip(log p_theta(w_k) - log p_ref(w_k))
                               - clip(log p_theta(l_k) - log p_ref(l_k)) ] )

Defaults follow the official config: beta 0.1, eps 0.1, 20 DDIM steps with eta 1.0, guidance 5.0
in sampling and training, every step trained. With the clipped log-ratios passed in place of
the policy terms, the core ``dpo`` loss is exactly this; other pairwise losses apply the same way.
"""

from __future__ import annotations

import math

import torch

from diffalign import losses

Tensor = torch.Tensor


def clipped_log_ratio(policy: Tensor, reference: Tensor, eps: float) -> Tensor:
    """log(p_theta / p_ref) clipped to [log(1 - eps), log(1 + eps)] (the authors' ratio clipping)."""
    return (policy - reference).clamp(math.log(1 - eps), math.log(1 + eps))


def d3po_step_loss(policy_w: Tensor, policy_l: Tensor, reference_w: Tensor, reference_l: Tensor, *,
                   beta: float = 0.1, eps: float = 0.1, loss: str = "dpo", **loss_options) -> Tensor:
    """(B,) loss of one denoising step of B trajectory pairs, from per-step log-probabilities."""
    spec = losses.spec(loss)
    if spec.kind != "pairwise":
        raise ValueError(f"d3po takes a pairwise loss; {loss!r} is {spec.kind}")
    chosen = reference_w + clipped_log_ratio(policy_w, reference_w, eps)
    rejected = reference_l + clipped_log_ratio(policy_l, reference_l, eps)
    return spec.fn(chosen, rejected, reference_w, reference_l, beta=beta, **loss_options)
