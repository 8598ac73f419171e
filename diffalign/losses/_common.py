"""Small tensor helpers shared by the loss modules.

Every loss upcasts its inputs to float32 first: the scores come from bf16/fp16 forwards in
mixed precision, and a logistic of a margin of 1e4 must stay finite in every dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# exp() argument bound: exp(80) ~ 5.5e34 is finite in float32 and so are its differences.
EXP_CLAMP = 80.0


def f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (a no-op for float32 and float64 inputs)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def logratios(policy: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """log pi_theta - log pi_ref per example; the policy score alone when ``reference`` is None."""
    policy = f32(policy)
    return policy if reference is None else policy - f32(reference)


def require_reference(name: str, *refs: torch.Tensor | None) -> None:
    """Clear error for a reference-based loss called with ``None`` references."""
    if any(r is None for r in refs):
        raise ValueError(
            f"loss {name!r} compares the policy with a reference model: pass the reference "
            "scores (ref_chosen, ref_rejected), or choose a reference-free loss such as 'simpo'."
        )


def per_length(scores: torch.Tensor, lengths: torch.Tensor | float | None) -> torch.Tensor:
    """Divide summed log-probs by their lengths (tokens, or 1 when ``lengths`` is None)."""
    if lengths is None:
        return scores
    lengths = torch.as_tensor(lengths, dtype=scores.dtype, device=scores.device)
    return scores / lengths.clamp(min=1.0)


def soft_logistic(logits: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
    """Binary cross-entropy of sigma(logits) against a soft label p = P(chosen is better).

    ``-(p * log sigma(z) + (1 - p) * log sigma(-z))``; p = 1 gives -log sigma(z).
    """
    p = torch.as_tensor(p, dtype=logits.dtype, device=logits.device)
    return -p * F.logsigmoid(logits) - (1.0 - p) * F.logsigmoid(-logits)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def exp_clamped(x: torch.Tensor) -> torch.Tensor:
    """exp(x) with x clamped to +-EXP_CLAMP so that huge margins stay finite."""
    return torch.exp(x.clamp(-EXP_CLAMP, EXP_CLAMP))


def as_weights(weights: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | float:
    """Per-example weights broadcast to ``like``'s dtype/device; 1.0 when None."""
    if weights is None:
        return 1.0
    return torch.as_tensor(weights, dtype=like.dtype, device=like.device)
