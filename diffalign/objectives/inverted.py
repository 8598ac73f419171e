"""What InPO and SmPO share: Diffusion-DPO scored at latents found by inverting the images.

Diffusion-DPO places x^w and x^l at x_t = a_t x_0 + b_t eps with random eps, which ties x_t to
the image only loosely. Both methods instead run the model's own DDIM inversion (optionally
stochastic, optionally ReNoise-refined; :mod:`diffalign.diffusion.inversion`) from the clean
latent up to the pair's timestep t, and score each image there against the noise that x_t implies:

    x_t   = Inv_theta(x_0 -> t)                       (the policy inverts, without gradients)
    eps^  = (x_t - a_t x_0) / b_t
    s(x)  = -w(t) ||target(x_0, eps^, t) - f_theta(x_t, t)||^2      (and s_ref with the reference)

after which the pairwise or soft-label core loss is the same as Diffusion-DPO's. With DDPM's
a_t = sqrt(alpha-bar_t), b_t = sqrt(1 - alpha-bar_t) this is InPO's Eq. 12 (the reparametrised
reward at the inverted latent). On a flow model (SD3/SD3.5, FLUX.1) a_t = 1 - sigma_t, b_t = sigma_t,
the inversion is the Euler inversion of the probability-flow ODE, and the target is the velocity
eps^ - x_0 = (x_t - x_0) / sigma_t: the straight line from the image through the inverted latent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.diffusion import Backbone, Conditioning, NoisedGroup
from diffalign.diffusion.inversion import ddim_invert_to
from diffalign.objectives.diffusion_dpo import DiffusionDPO
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


@dataclass
class InversionOptions:
    # the DDIM inversion grid (points over the whole schedule)
    inversion_steps: int = ranged(10, "[1, inf)")
    # the inversion's stochastic term eta
    inversion_eta: float = ranged(0.0, "[0, 1]")
    # ReNoise refinements per inversion move
    renoise_iterations: int = ranged(0, "[0, inf)")


class InvertedDiffusionDPO(DiffusionDPO):
    """Diffusion-DPO at inverted latents; subclasses set the inversion's defaults."""

    renoise_average_from = 1

    Options = InversionOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        options = self.options_of(config)
        self.inversion_steps, self.inversion_eta = options.inversion_steps, options.inversion_eta
        self.renoise_iterations = options.renoise_iterations

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """The pairs' timesteps, and a seed for the inversion's stochastic term."""
        timesteps = self.sampler.sample(n, self.schedule.num_timesteps, generator)
        return {"timesteps": timesteps, "inversion_seed": torch.randint(0, 2**62, (1,), generator=generator)}

    def noise(self, backbone: Backbone, latents: Tensor, cond: Conditioning,
              randomness: dict[str, Tensor]) -> NoisedGroup:
        """Every item inverted to its pair's timestep (one batched walk), and the noise that implies."""
        b, k = latents.shape[:2]
        x0 = latents.flatten(0, 1).float()
        t = randomness["timesteps"].to(latents.device).repeat_interleave(k)
        cond = cond.repeat_items(k)
        generator = torch.Generator().manual_seed(int(randomness["inversion_seed"][0]))
        x_t = ddim_invert_to(backbone, x0, cond, t, steps=self.inversion_steps, eta=self.inversion_eta,
                             renoise_iterations=self.renoise_iterations,
                             renoise_average_from=self.renoise_average_from, generator=generator)
        signal, noise = (c.to(x_t).view(-1, *([1] * (x0.dim() - 1))) for c in self.schedule.coefficients(t))
        implied = (x_t - signal * x0) / noise
        return NoisedGroup(noisy=x_t.to(latents.dtype), target=self.schedule.target(x0, implied, t).to(latents.dtype),
                           model_timesteps=self.schedule.model_timesteps(t), weight=self.schedule.loss_weight(t, self.weighting),
                           cond=cond, groups=b, items=k)
