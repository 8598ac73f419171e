"""DRaFT (Clark, Vicol, Swersky and Fleet 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
ICLR 2024, arXiv 2309.17400): backpropagate a differentiable reward through the last K steps of the sampler.

The sampler runs from noise to a clean latent; only the last K of its steps keep their gradient (DRaFT-K, the
paper's Algorithm 1 with truncation; K = 1 worked best in the paper), the decoded image is scored, and the loss is
-reward. DRaFT-LV (``lv_samples`` n > 0, the paper's low-variance variant) samples the whole chain without gradients,
then noises the clean latent afresh n times to the last step's noise level and takes that last step with gradients
from each, averaging the n rewards: n reward gradients for the price of n single steps. The machinery (sampling with
gradients, checkpointing, the differentiable rewards) is :mod:`diffalign.objectives.reward_gradient`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.errors import UserError
from diffalign.objectives.reward_gradient import RewardGradientObjective, RewardGradientOptions

Tensor = torch.Tensor


@dataclass
class DRaFTOptions(RewardGradientOptions):
    # the last K steps of the sampler keep their gradient (DRaFT-K)
    k: int = ranged(1, "[1, inf)")
    # DRaFT-LV: n fresh noisings of the clean sample to the last step's level, each denoised with gradients; 0: off
    lv_samples: int = ranged(0, "[0, inf)")


class DRaFT(RewardGradientObjective):
    """Fine-tuning through the reward's gradient over the sampler's last K steps; see the module docstring."""

    paper = "Clark et al. 2024, arXiv 2309.17400"
    loss_kinds = ("draft",)
    own_losses = ("draft",)

    Options = DRaFTOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        o = self.options
        if o.k > config.sample_steps:
            raise UserError(f"objective.options.k={o.k} exceeds the sampler's {config.sample_steps} steps")
        if o.lv_samples and o.k != 1:
            raise UserError("DRaFT-LV (objective.options.lv_samples > 0) trains the last step alone: set "
                            "objective.options.k=1")

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        if not self.options.lv_samples:
            return {}
        return {"lv_noise": torch.randn((n, self.options.lv_samples, *latent_shape), generator=generator)}

    def first_trained_step(self, randomness: dict[str, Tensor]) -> int:
        return self.sample_steps - self.options.k

    def final_latents(self, backbone: Backbone, noise: Tensor, cond: Conditioning, policy: nn.Module,
                      randomness: dict[str, Tensor]) -> Tensor:
        """DRaFT-K: the chain; DRaFT-LV: (n B, C, h, w), the clean sample re-noised n times and denoised by the
        last step with gradients."""
        if not self.options.lv_samples:
            return super().final_latents(backbone, noise, cond, policy, randomness)
        rule, last = self.rule(backbone, noise), self.sample_steps - 1
        steps = randomness["step_noise"]
        clean = self.sample(backbone, rule, noise.float(), cond, policy, steps, 0, self.sample_steps, self.sample_steps)
        n = self.options.lv_samples
        lv_noise = randomness["lv_noise"].transpose(0, 1).flatten(0, 1)  # (n B, ...), draw-major
        noised = rule.noised(clean.repeat(n, *[1] * (clean.dim() - 1)), [last] * len(lv_noise), lv_noise)
        return self.sample(backbone, rule, noised, Conditioning.cat([cond] * n), policy, steps.repeat(n, *[1] * (steps.dim() - 1)),
                           last, self.sample_steps, last)

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, prompts: list[str],
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n = max(self.options.lv_samples, 1)
        return super().__call__(backbone, latents, cond, randomness, policy, reference, prompts=list(prompts) * n)
