"""Stochastic sampling that records its trajectory and each step's log-probability.

Online objectives (D3PO, DDO's self-play rounds) treat denoising as a Markov decision process:
each sampler step x_k -> x_{k+1} is a Gaussian policy p_theta(x_{k+1} | x_k, c), and training
re-scores recorded steps under the current policy and the reference. Two step rules:

- DDIM with eta > 0 (Song et al. 2021, Eq. 12; DDPO's ``ddim_step_with_logprob``), for epsilon-
  and v-prediction models: the mean is diffusers' ``DDIMScheduler.step`` with zero noise, the
  standard deviation eta * sqrt(((1 - a_prev) / (1 - a_t)) (1 - a_t / a_prev)).
- The flow-matching SDE of Flow-GRPO (Liu et al. 2025, Eq. 9) for SD3/SD3.5 and FLUX.1 (on the grid
  their pipelines sample on, :meth:`~diffalign.diffusion.backbones.Backbone.sampling_scheduler`): from sigma to sigma'
  (dt = sigma' - sigma < 0) with velocity v and std_t = a sqrt(sigma / (1 - sigma)),

      mean = x + (v + std_t^2 / (2 sigma) (x + (1 - sigma) v)) dt,   std = std_t sqrt(-dt),

  whose marginals match the deterministic flow; ``eta`` plays the role of a (0.7 in Flow-GRPO).

A step's log-probability is the Gaussian log-density of the recorded next latent averaged over
its elements, as DDPO and D3PO compute it (comparable across resolutions). Classifier-free
guidance, when used, is part of the policy: the guided prediction defines the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import nn
from tqdm.auto import tqdm

from diffalign.diffusion.backbones import Backbone, Conditioning
from diffalign.diffusion.schedule import DiffusionSchedule

Tensor = torch.Tensor


@dataclass
class Trajectory:
    """What a stochastic sampler did, enough to re-score any step under another model.

    Attributes:
        latents: (B, T + 1, C, h, w) x_0 (the starting noise) ... x_T (the clean latent).
        timesteps: (T,) the model timesteps of the steps.
        log_probs: (B, T) log p(x_{k+1} | x_k) under the sampling model.
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


class StepRule:
    """One sampler's grid and Gaussian step, for a backbone's scheduler family."""

    def __init__(self, backbone: Backbone, steps: int, eta: float, latent_shape: tuple[int, ...]) -> None:
        """``latent_shape`` (.., h, w) of the sampled latents: FLUX.1's grid shifts with the image size."""
        if eta <= 0:
            raise ValueError("a stochastic sampler needs eta > 0 (eta = 0 is deterministic: no log-probability)")
        self.flow = "FlowMatch" in type(backbone.scheduler).__name__
        self.eta = eta
        if self.flow:
            scheduler = backbone.sampling_scheduler(steps, latent_shape)
            self.sigmas = scheduler.sigmas.float()  # steps + 1 values, the last 0
            self.timesteps = scheduler.timesteps.float()
        else:
            self.scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
            self.scheduler.set_timesteps(steps)
            self.timesteps = self.scheduler.timesteps
            self.schedule = DiffusionSchedule(self.scheduler)

    def coefficients(self, k: int) -> tuple[float, float]:
        """(a, b) of step k's noise level, x = a x_0 + b eps: (1 - sigma, sigma) on a flow model, the DDPM
        schedule's at the step's timestep otherwise."""
        if self.flow:
            sigma = self.sigmas[k].item()
            return 1 - sigma, sigma
        a, b = self.schedule.coefficients(torch.tensor([int(self.timesteps[k])]))
        return a.item(), b.item()

    def clean(self, k: int, x: Tensor, output: Tensor) -> Tensor:
        """The x_0 a model output at (x, step k) implies: x - sigma v on a flow model (the step's inference sigma, not
        a training-grid one), the DDPM schedule's split of an epsilon, v or sample prediction otherwise."""
        if self.flow:
            return x.float() - self.sigmas[k].item() * output.float()
        return self.schedule.split(output, x, torch.full((x.shape[0],), int(self.timesteps[k])))[0]

    def distribution(self, k: int, x: Tensor, output: Tensor, *, stochastic: bool = True) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (a scalar tensor) of step k from x, given the model's (guided) output;
        ``stochastic`` False: the deterministic step at eta 0 (the ODE's Euler step, or DDIM), std 0."""
        x, output = x.float(), output.float()
        eta = self.eta if stochastic else 0.0
        if self.flow:
            sigma, nxt = self.sigmas[k].item(), self.sigmas[k + 1].item()
            dt = nxt - sigma
            # at sigma = 1 the ratio diverges; Flow-GRPO uses the next sigma there
            std_t = eta * math.sqrt(sigma / (1 - (self.sigmas[1].item() if sigma >= 1 else sigma)))
            mean = x + (output + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * output)) * dt
            return mean, torch.tensor(std_t * math.sqrt(-dt))
        t = int(self.timesteps[k])
        mean = self.scheduler.step(output, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        return mean, eta * self.scheduler._get_variance(t, prev).float().sqrt()


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) log N(sample; mean, std^2 I) averaged over each sample's elements."""
    std = std.to(mean)
    log_density = -((sample.float() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def _guided(backbone: Backbone, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
            guidance_scale: float, denoiser: nn.Module | None) -> Tensor:
    """The (guided) model output at timestep ``t``: one for the batch, or one per item."""
    timesteps = t.expand(x.shape[0]).to(x.device)
    if guidance_scale == 1.0 or (uncond is None and cond.negative_embeds is None):
        return backbone.predict(x, timesteps, cond, denoiser)
    both = backbone.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), cond.guidance_batch(uncond),
                            denoiser)
    unconditional, conditional = both.float().chunk(2)
    return backbone.combine_guidance(unconditional, conditional, guidance_scale)


@torch.no_grad()
def sample_trajectories(backbone: Backbone, noise: Tensor, cond: Conditioning, *, steps: int = 20, eta: float = 1.0,
                        guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                        generator: torch.Generator | None = None, denoiser: nn.Module | None = None,
                        progress: str | None = None, step_noise: Tensor | None = None,
                        stochastic: Tensor | None = None) -> Trajectory:
    """Sample from ``noise`` (B, C, h, w) with the stochastic rule, recording every step.

    ``uncond`` (one prompt's conditioning, e.g. the empty prompt, repeated to B) enables
    classifier-free guidance at ``guidance_scale``. ``generator`` (on the CPU) draws the step noise,
    unless ``step_noise`` (B, steps, C, h, w) gives it, e.g. drawn per item so that a sample does
    not depend on the batch it is drawn in.
    ``progress`` names a progress bar over the steps (none when None). ``stochastic`` (steps,) bool marks
    the steps that draw noise (MixGRPO's window); the others take the deterministic step (eta 0) and record
    a log-probability of 0, having no density to train on. The step noise is drawn for every step either
    way, so a window does not change the noise of the steps inside it.
    """
    rule = StepRule(backbone, steps, eta, tuple(noise.shape[1:]))
    x = noise.float()
    latents, log_probs = [x], []
    for k, t in enumerate(tqdm(rule.timesteps, desc=progress, disable=progress is None, leave=False)):
        noisy = stochastic is None or bool(stochastic[k])
        mean, std = rule.distribution(k, x, _guided(backbone, x, t, cond, uncond, guidance_scale, denoiser),
                                      stochastic=noisy)
        z = (torch.randn(x.shape, generator=generator, dtype=torch.float32) if step_noise is None
             else step_noise[:, k].float()).to(x.device)
        if noisy:
            x = mean + std.to(mean) * z
            log_probs.append(gaussian_log_prob(x, mean, std))
        else:
            x = mean
            log_probs.append(torch.zeros(x.shape[0], device=x.device))
        latents.append(x)
    return Trajectory(torch.stack(latents, dim=1), rule.timesteps.clone(), torch.stack(log_probs, dim=1))


def step_distribution(backbone: Backbone, latents: Tensor, k: int | Tensor, cond: Conditioning, *, eta: float = 1.0,
                      guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                      denoiser: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """(mean (B, C, h, w), std (B,)) of recorded step k (one index, or one per trajectory) under ``denoiser``.

    ``latents`` are recorded trajectories (B, T + 1, C, h, w) (:attr:`Trajectory.latents`); the
    sampler's T steps and their timesteps follow from T and ``eta``. Differentiable when called with
    gradients enabled. One forward for the whole batch, each trajectory at its own step's timestep (the
    sampler's grid, on the CPU); only the step rule's arithmetic (scalar per step) goes step by step.
    """
    b, steps = latents.shape[0], latents.shape[1] - 1
    rule = StepRule(backbone, steps, eta, tuple(latents.shape[2:]))
    index = torch.as_tensor(k)
    step_of = (index.expand(b) if index.dim() == 0 else index).tolist()  # one host read: the rule is per step
    x = latents[torch.arange(b, device=latents.device), torch.tensor(step_of, device=latents.device)]
    output = _guided(backbone, x, rule.timesteps[step_of], cond, uncond, guidance_scale, denoiser)
    means, stds = [None] * b, [None] * b
    for step in sorted(set(step_of)):
        members = [i for i, s in enumerate(step_of) if s == step]
        mean, std = rule.distribution(step, x[members], output[members])
        for j, i in enumerate(members):
            means[i], stds[i] = mean[j], std
    return torch.stack(means), torch.stack(stds).to(latents.device)


def step_log_prob(backbone: Backbone, latents: Tensor, k: int | Tensor, cond: Conditioning, *, eta: float = 1.0,
                  guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                  denoiser: nn.Module | None = None) -> Tensor:
    """(B,) log-probability of recorded step k (one index, or one per trajectory) under ``denoiser``
    (:func:`step_distribution`); differentiable when called with gradients enabled: the policy term of D3PO."""
    b = latents.shape[0]
    index = torch.as_tensor(k)
    step_of = (index.expand(b) if index.dim() == 0 else index).to(latents.device)
    mean, std = step_distribution(backbone, latents, k, cond, eta=eta, guidance_scale=guidance_scale, uncond=uncond,
                                  denoiser=denoiser)
    nxt = latents[torch.arange(b, device=latents.device), step_of + 1]
    return gaussian_log_prob(nxt, mean, std.view(-1, *([1] * (mean.dim() - 1))))
