"""What the online methods that train on the forward process share (DiffusionNFT, AWM, DGPO): a round's clean samples
with their group-relative advantages as units, each noised afresh at one of the sampler's noise levels, the
predictions of any denoiser at that noised sample, and a trailing EMA of the trained weights (NFT's old policy, AWM's
anchor, DGPO's old policy). No sampler likelihood enters, so rounds keep only the clean samples, and the sampler may
be any solver, the deterministic one included (``objective.sample_eta=0``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning, reference_denoiser
from diffalign.diffusion.logprob import StepRule, guided_output
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.grpo import round_advantages

Tensor = torch.Tensor


TRAILING_DECAY_RATE = 0.001  # the authors' linear EMA schedule: decay min(max, 0.001 * step)


class TrailingWeights:
    """An EMA of the trained weights that trails the policy by a few steps: after the s-th optimiser step (s from 1)
    it moves towards the trained weights with decay min(``max_decay``, 0.001 (s - ``lag``)), so it starts as a copy
    and trails more as training goes. ``lag`` 1 where the authors read their step counter before incrementing it
    (DiffusionNFT's ``decay_type`` 1, DGPO's ``ema_ref``), 0 where after (AWM's ``kl_ema_decay_type="linear"``). Only
    the trained tensors are kept (:class:`ShadowWeights`), and they are saved in every checkpoint."""

    def __init__(self, denoiser: nn.Module, max_decay: float, lag: int) -> None:
        self.weights = ShadowWeights(denoiser)
        self.max_decay, self.lag, self.optimizer_steps = max_decay, lag, 0

    def step(self) -> None:
        self.optimizer_steps += 1
        self.weights.update(min(self.max_decay, TRAILING_DECAY_RATE * (self.optimizer_steps - self.lag)))

    def denoiser(self) -> nn.Module:
        return self.weights.denoiser()

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        self.optimizer_steps = int(state["optimizer_steps"])


class ForwardProcessObjective(OnlineObjective):
    """An online objective trained on clean samples noised afresh; subclasses define ``__call__`` and ``Options``
    (an :class:`~diffalign.objectives.grpo.AdvantageOptions`), and their ``__init__`` sets ``options``,
    ``sample_steps`` and ``eta``. One that keeps a trailing EMA (:class:`TrailingWeights`) says with what schedule
    in :meth:`trailing_schedule`; it is then ``trailing`` once the trainer attached the denoiser.

    Its units are called with ``latents`` (B, 1, C, h, w) clean samples, ``randomness`` the sampler step (B,) each
    is trained at and the noise (B, C, h, w), and the target ``advantage`` (B,).
    """

    group_size = 8
    shared_noise = False
    takes_labels = False
    keeps_trajectories = False  # trains on the clean samples only

    trailing: TrailingWeights | None = None

    def trailing_schedule(self) -> tuple[float, int] | None:
        """(largest decay, lag) of the trailing EMA the method keeps (:class:`TrailingWeights`); None: it keeps none."""
        return None

    def attach(self, denoiser: nn.Module) -> list[Any]:
        schedule = self.trailing_schedule()
        if schedule is None:
            return []
        self.trailing = TrailingWeights(denoiser, *schedule)
        return [self.trailing]

    def after_optimizer_step(self) -> None:
        if self.trailing is not None:
            self.trailing.step()

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

    def predict(self, net: nn.Module, guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """(B, C, h, w) float32 prediction of ``net`` at the noised samples (with gradients when enabled); guided at
        ``guidance_scale`` by the unconditional branch ``uncond`` (one prompt's conditioning) when it is not 1."""
        if guidance_scale == 1.0:
            return self.backbone.predict(self.x_t.to(self.dtype), self.timesteps, self.cond, denoiser=net).float()
        if uncond is not None:  # else each item's own negative (a text encoder that reads the sources)
            uncond = uncond.to(device=self.x_t.device, dtype=self.dtype).repeat_items(len(self.x_t))
        return guided_output(self.backbone, self.x_t.to(self.dtype), self.timesteps, self.cond, uncond,
                             guidance_scale, net).float()

    def reference_prediction(self, reference: nn.Module | None, guidance_scale: float = 1.0,
                             uncond: Conditioning | None = None) -> Tensor:
        """The reference's prediction (the base: adapters disabled, or the frozen copy), without gradients."""
        with torch.no_grad(), reference_denoiser(self.backbone.denoiser, reference) as frozen:
            return self.predict(frozen, guidance_scale, uncond)

    def reference_squared_difference(self, prediction: Tensor, reference: nn.Module | None) -> Tensor:
        """The mean over the batch of the mean squared difference between ``prediction`` and the reference's: the KL
        term of DiffusionNFT and AWM."""
        return squared_difference(prediction, self.reference_prediction(reference))

    def clean(self, output: Tensor) -> Tensor:
        """The x_0 each row's ``output`` implies at its step (:meth:`StepRule.clean`)."""
        return torch.stack([self.rule.clean(k, self.x_t[i:i + 1], output[i:i + 1])[0] for i, k in enumerate(self.steps)])


def squared_difference(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of each row's mean squared difference."""
    return (a - b).pow(2).flatten(1).mean(dim=1).mean()
