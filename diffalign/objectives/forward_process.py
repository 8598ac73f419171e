"""What the online methods that train on the forward process share (DiffusionNFT, AWM): a round's clean samples with
their group-relative advantages as units, each noised afresh at one of the sampler's noise levels, and the
predictions of any denoiser at that noised sample. No sampler likelihood enters, so rounds keep only the clean
samples, and the sampler may be any solver."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning, reference_denoiser
from diffalign.diffusion.logprob import StepRule
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.grpo import round_advantages

Tensor = torch.Tensor


class ForwardProcessObjective(OnlineObjective):
    """An online objective trained on clean samples noised afresh; subclasses define ``__call__`` and ``Options``
    (an :class:`~diffalign.objectives.grpo.AdvantageOptions`), and their ``__init__`` sets ``options``,
    ``sample_steps`` and ``eta``.

    Its units are called with ``latents`` (B, 1, C, h, w) clean samples, ``randomness`` the sampler step (B,) each
    is trained at and the noise (B, C, h, w), and the target ``advantage`` (B,).
    """

    group_size = 8
    shared_noise = False
    takes_labels = False
    keeps_trajectories = False  # trains on the clean samples only

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        return {"noise": torch.randn((n, *latent_shape), generator=generator)}

    def training_units(self, round_) -> dict[str, Any]:
        """Every clean sample of the round with its advantage."""
        advantages, prompt_of = round_advantages(round_, self.options.advantage_std)
        return {"latents": round_.latents[:, :, -1].flatten(0, 1)[:, None], "prompt_of": prompt_of,
                "targets": {"advantage": advantages}}

    def noised(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
               policy: nn.Module) -> "NoisedSamples":
        """The units' clean samples x_0 noised at their steps, x_t = a_t x_0 + b_t eps, on the sampler's grid."""
        x0 = latents[:, 0].float()
        rule = StepRule(backbone, self.sample_steps, self.eta, tuple(x0.shape[1:]))
        steps = randomness["step"].tolist()
        x_t = rule.noised(x0, steps, randomness["noise"])
        return NoisedSamples(backbone, rule, steps, x0, x_t, randomness["noise"].to(x0), cond, policy)


class NoisedSamples:
    """A batch of clean samples noised at their sampler steps, and what any denoiser predicts there."""

    def __init__(self, backbone: Backbone, rule: StepRule, steps: list[int], x0: Tensor, x_t: Tensor, noise: Tensor,
                 cond: Conditioning, policy: nn.Module) -> None:
        self.backbone, self.rule, self.steps, self.x0, self.x_t, self.noise = backbone, rule, steps, x0, x_t, noise
        self.timesteps = rule.timesteps[steps].to(x0.device)
        self.dtype = next(policy.parameters()).dtype
        self.cond = cond.to(dtype=self.dtype)

    def predict(self, net: nn.Module) -> Tensor:
        """(B, C, h, w) float32 prediction of ``net`` at the noised samples (with gradients when enabled)."""
        return self.backbone.predict(self.x_t.to(self.dtype), self.timesteps, self.cond, denoiser=net).float()

    def reference_squared_difference(self, prediction: Tensor, reference: nn.Module | None) -> Tensor:
        """The mean over the batch of the mean squared difference between ``prediction`` and the reference's (the
        base: adapters disabled, or the frozen copy): the KL term of DiffusionNFT and AWM."""
        with torch.no_grad(), reference_denoiser(self.backbone.denoiser, reference) as frozen:
            ref = self.predict(frozen)
        return squared_difference(prediction, ref)

    def clean(self, output: Tensor) -> Tensor:
        """The x_0 each row's ``output`` implies at its step (:meth:`StepRule.clean`)."""
        return torch.stack([self.rule.clean(k, self.x_t[i:i + 1], output[i:i + 1])[0] for i, k in enumerate(self.steps)])


def squared_difference(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of each row's mean squared difference."""
    return (a - b).pow(2).flatten(1).mean(dim=1).mean()
