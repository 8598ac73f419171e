"""The reward-model interface: images and prompts in, one score per image out."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    """Scores images against their prompts; higher is better.

    ``images`` is float (N, 3, H, W) in [0, 1] (what :func:`diffalign.diffusion.sampling.generate`
    returns); the result is float (N,) on the CPU. Implementations batch internally and run
    under ``torch.no_grad``.
    """

    name: str
    description: str  # one sentence for a report: what the score measures, its range, which way is better

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...
