"""AlignProp (Prabhudesai, Goyal, Pathak and Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation", arXiv 2310.03739): backpropagate a differentiable reward through the sampler from a random step
on, every step's model call checkpointed.

As in the authors' ``pipeline_step_with_grad`` (mihirp1998/AlignProp, ``sd_pipeline.py``), one step b is drawn per
batch and the model calls of steps b ... T - 1 keep their gradient (earlier outputs detached): with their
``backprop_strategy="gaussian"`` b ~ round(N(42, 5)) of 50 steps, redrawn until 1 <= b <= T - 1, here as fractions
of the sampler's steps (``start_mean`` 0.84, ``start_std`` 0.1; std 0 fixes b, their ``fixed``). Each model call is
checkpointed (their ``gradient_checkpoint``), so memory holds one step's activations whatever the number of steps
trained. The loss is -reward times their ``loss_coeff`` 0.01 (``reward_scale``); they sample with guidance 5 and
DDIM eta 1 (``objective.sample_guidance_scale``, ``sample_eta``). The machinery is
:mod:`diffalign.objectives.reward_gradient`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.config import ranged
from diffalign.errors import UserError
from diffalign.objectives.reward_gradient import RewardGradientObjective, RewardGradientOptions

Tensor = torch.Tensor


@dataclass
class AlignPropOptions(RewardGradientOptions):
    # the loss is -reward_scale x reward (AlignProp's loss_coeff)
    reward_scale: float = ranged(0.01, "(0, inf)")
    # the mean of the first trained step b, as a fraction of the sampler's steps (AlignProp's 42 of 50)
    start_mean: float = ranged(0.84, "[0, 1]")
    # its standard deviation, as a fraction of the steps (AlignProp's 5 of 50); 0: always the mean
    start_std: float = ranged(0.1, "[0, 1]")


class AlignProp(RewardGradientObjective):
    """Reward backpropagation from a random step on; see the module docstring."""

    paper = "Prabhudesai et al. 2023, arXiv 2310.03739"
    loss_kinds = ("alignprop",)
    own_losses = ("alignprop",)

    Options = AlignPropOptions

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        if config.sample_steps < 2:
            raise UserError("AlignProp trains the steps from b on, 1 <= b <= T - 1: objective.sample_steps must be >= 2")

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """Each unit's first trained step b, redrawn until 1 <= b <= T - 1 (one per batch is used: the first)."""
        steps, o = self.sample_steps, self.options
        first = torch.empty(n, dtype=torch.long)
        for i in range(n):
            b = -1
            while not 1 <= b <= steps - 1:
                b = int(o.start_mean * steps + o.start_std * steps * torch.randn((), generator=generator).item())
                if o.start_std == 0:
                    b = min(max(b, 1), steps - 1)
            first[i] = b
        return {"first_trained": first}

    def first_trained_step(self, randomness: dict[str, Tensor]) -> int:
        return int(randomness["first_trained"][0])
