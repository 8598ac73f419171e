"""ReFL, reward feedback learning (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS 2023, arXiv 2304.05977, Section 4): stop the sampler at a random late step, predict
the clean image from there in one model call with gradients, and follow the reward of that prediction.

As in the authors' ``ReFL.py`` (THUDM/ImageReward): the sampler (their DDPM scheduler, 40 steps, no guidance) runs
without gradients to a step m drawn uniformly from the last quarter of its steps (their ``random.randint(30, 39)``:
``stop_from`` 0.75 and ``stop_to`` 1, fractions of the steps), the model is called once at m with gradients, the x_0 its
output implies (:meth:`~diffalign.diffusion.logprob.StepRule.clean`, their ``pred_original_sample``) is decoded and
scored, and the loss is ``reward_scale`` mean(ReLU(margin - reward)) (their ``F.relu(-rewards + 2)`` times
``grad_scale`` 1e-3): images already past the margin stop pulling. The machinery is
:mod:`diffalign.objectives.reward_gradient`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.errors import UserError
from diffalign.objectives.reward_gradient import RewardGradientObjective, RewardGradientOptions
from diffalign.sharded import most_over_processes

Tensor = torch.Tensor


@dataclass
class ReFLOptions(RewardGradientOptions):
    # the loss is reward_scale x mean(ReLU(margin - reward)) (ReFL's grad_scale)
    reward_scale: float = ranged(1e-3, "(0, inf)")
    # rewards above the margin give no gradient (ReFL's 2, for ImageReward's scale)
    margin: float = 2.0
    # the stop step m is drawn from [stop_from, stop_to) of the sampler's steps, as fractions (ReFL's 30-39 of 40)
    stop_from: float = ranged(0.75, "[0, 1)")
    stop_to: float = ranged(1.0, "(0, 1]")


class ReFL(RewardGradientObjective):
    """Reward feedback learning on one x_0 prediction; see the module docstring."""

    paper = "Xu et al. 2023, arXiv 2304.05977"
    loss_kinds = ("refl",)
    own_losses = ("refl",)

    Options = ReFLOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        start, end = self.options.stop_from, self.options.stop_to
        self.first, self.last = math.ceil(start * config.sample_steps), math.ceil(end * config.sample_steps) - 1
        if self.first > self.last:
            raise UserError(f"objective.options.stop_from={start} and stop_to={end} hold none of the sampler's "
                            f"{config.sample_steps} steps: widen the range or raise objective.sample_steps")

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """Each unit's stop step m (one per batch is used: the first)."""
        return {"stop": torch.randint(self.first, self.last + 1, (n,), generator=generator)}

    def first_trained_step(self, randomness: dict[str, Tensor]) -> int:
        return int(randomness["stop"][0])

    def final_latents(self, backbone: Backbone, noise: Tensor, cond: Conditioning, policy: nn.Module,
                      randomness: dict[str, Tensor]) -> Tensor:
        rule, stop = self.rule(backbone, noise), self.first_trained_step(randomness)
        latest = most_over_processes(stop, policy)  # agreed before any forward: an FSDP2 process may stop later
        x = self.sample(backbone, rule, noise.float(), cond, policy, randomness["step_noise"], 0, stop, stop)
        at = rule.timesteps[stop:stop + 1].to(x.device)
        for _ in range(latest - stop):  # as many forwards as that process makes, outputs dropped
            self.model_output(backbone, x, at, cond, policy, False)
        output = self.model_output(backbone, x, at, cond, policy, True)
        return rule.clean(stop, x, output)

    def reward_loss(self, reward: Tensor) -> Tensor:
        return self.options.reward_scale * torch.relu(self.options.margin - reward).mean()
