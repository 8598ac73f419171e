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
from diffalign.errors import UserError

Tensor = torch.Tensor
SAMPLERS = ("sde", "cps")


@dataclass
class Trajectory:
    """What a stochastic sampler did, enough to re-score any step under another model.

    Attributes:
        latents: (B, T + 1, C, h, w) x_0 (the starting noise) ... x_T (the clean latent).
        timesteps: (T,) the model timesteps of the steps.
        log_probs: (B, T) log p(x_{k+1} | x_k) under the sampling model.
        means: (B, T, C, h, w) each step's Gaussian mean under the sampling model, when recorded
            (``record_means``: GRPO-Guard's ratio needs the sampler's mean, not only its log-probability).
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    means: Tensor | None = None

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


class StepRule:
    """One sampler's grid and Gaussian step, for a backbone's scheduler family."""

    def __init__(self, backbone: Backbone, steps: int, eta: float, latent_shape: tuple[int, ...], *,
                 sampler: str = "sde") -> None:
        """``latent_shape`` (.., h, w) of the sampled latents: FLUX.1's grid shifts with the image size. ``sampler``:
        the flow SDE (``sde``) or coefficients-preserving sampling (``cps``, flow models only; :meth:`distribution`)."""
        if eta < 0:
            raise ValueError(f"the sampler's eta must be >= 0 (0: the deterministic ODE or DDIM step), got {eta}")
        self.flow = "FlowMatch" in type(backbone.scheduler).__name__
        if sampler not in SAMPLERS:
            raise UserError(f"objective.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if sampler == "cps" and not self.flow:
            raise UserError("objective.sampler=cps is coefficients-preserving sampling for flow models; this model's "
                            "DDIM step with eta already keeps its coefficients: use objective.sampler=sde")
        self.eta, self.sampler = eta, sampler
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

    def level_drop(self, k: int) -> float:
        """How far step k lowers the noise level, the flow's -dt: sigma_k - sigma_{k+1} on a flow model; on a DDPM-
        family model the drop of b / (a + b) (:meth:`coefficients`), the level of the flow's path the latent sits on
        once rescaled by 1 / (a + b); the level after the last step is 0."""
        if self.flow:
            return self.sigmas[k].item() - self.sigmas[k + 1].item()
        a, b = self.coefficients(k)
        after = 0.0
        if k + 1 < len(self.timesteps):
            a_next, b_next = self.coefficients(k + 1)
            after = b_next / (a_next + b_next)
        return b / (a + b) - after

    def noised(self, x0: Tensor, steps: list[int], noise: Tensor) -> Tensor:
        """The forward process at each row's step: x_k = a_k x_0 + b_k eps (:meth:`coefficients`), for methods that
        train on clean samples noised afresh at the sampler's noise levels (DiffusionNFT, AWM)."""
        a, b = (torch.tensor(c, device=x0.device).view(-1, *([1] * (x0.dim() - 1)))
                for c in zip(*(self.coefficients(k) for k in steps)))
        return a * x0 + b * noise.to(x0)

    def target(self, x0: Tensor, steps: list[int], noise: Tensor) -> Tensor:
        """What the model is trained to predict for x_0 noised with eps at each row's step: the velocity eps - x_0 on
        a flow model, the DDPM schedule's epsilon, v or sample target otherwise (float32)."""
        if self.flow:
            return noise.float() - x0.float()
        return self.schedule.target(x0.float(), noise.float(), self.timesteps[steps].to(x0.device))

    def noise_level(self, steps: list[int]) -> Tensor:
        """(B,) each row's step as a noise level in [0, 1]: sigma on a flow model, t / T otherwise."""
        if self.flow:
            return self.sigmas[steps].clone()
        return self.timesteps[steps].float() / self.scheduler.config.num_train_timesteps

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
        if self.flow and self.sampler == "cps":
            # flow_grpo's sde_step_with_logprob, sde_type="cps": x0 and x1 (the noise) as the output implies them,
            # recombined at the next level, (1 - s') x0 + sqrt(s'^2 - std^2) x1, with std = s' sin(eta pi / 2)
            sigma, nxt = self.sigmas[k].item(), self.sigmas[k + 1].item()
            std_t = nxt * math.sin(eta * math.pi / 2)
            x0, x1 = x - sigma * output, x + (1 - sigma) * output
            return x0 * (1 - nxt) + x1 * math.sqrt(max(nxt ** 2 - std_t ** 2, 0.0)), torch.tensor(std_t)
        if self.flow:
            sigma, nxt = self.sigmas[k].item(), self.sigmas[k + 1].item()
            dt = nxt - sigma
            # at sigma = 1 the ratio diverges, and Flow-GRPO uses the grid's second sigma there; a grid that starts
            # just below 1 (UniPC's for Wan: 1 - 1e-6, where the step's std would be eta x 1000) starts above its
            # second sigma all the same, so any sigma above it takes it
            std_t = eta * math.sqrt(sigma / (1 - min(sigma, self.sigmas[1].item())))
            mean = x + (output + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * output)) * dt
            return mean, torch.tensor(std_t * math.sqrt(-dt))
        t = int(self.timesteps[k])
        mean = self.scheduler.step(output, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        return mean, eta * self.scheduler._get_variance(t, prev).float().sqrt()


    def noisy(self, k: int) -> bool:
        """Whether step k draws noise at all: not at eta 0 (the deterministic sampler, which methods that train on
        the clean samples only may use), nor the last step of ``cps``, whose next noise level is 0."""
        return self.eta > 0 and not (self.sampler == "cps" and self.sigmas[k + 1].item() == 0)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) log N(sample; mean, std^2 I) averaged over each sample's elements."""
    std = std.to(mean)
    log_density = -((sample.float() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def transition_log_prob(sample: Tensor, mean: Tensor, std: Tensor, sampler: str = "sde") -> Tensor:
    """(B,) a sampler step's log-probability of ``sample``: the Gaussian's (:func:`gaussian_log_prob`), or under
    ``cps`` flow_grpo's -mean (sample - mean)^2, its constants and 1 / (2 std^2) scale dropped as the authors drop
    them, so that ratios and the clip range mean what they mean in their runs."""
    if sampler == "cps":
        return -((sample.float() - mean) ** 2).flatten(1).mean(dim=1)
    return gaussian_log_prob(sample, mean, std)


def guided_output(backbone: Backbone, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
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
                        stochastic: Tensor | None = None, sampler: str = "sde", record_means: bool = False
                        ) -> Trajectory:
    """Sample from ``noise`` (B, C, h, w) with the stochastic rule, recording every step.

    ``uncond`` (one prompt's conditioning, e.g. the empty prompt, repeated to B) enables
    classifier-free guidance at ``guidance_scale``. ``generator`` (on the CPU) draws the step noise,
    unless ``step_noise`` (B, steps, C, h, w) gives it, e.g. drawn per item so that a sample does
    not depend on the batch it is drawn in.
    ``progress`` names a progress bar over the steps (none when None). ``stochastic`` (steps,) bool marks
    the steps that draw noise (MixGRPO's window); the others take the deterministic step (eta 0) and record
    a log-probability of 0, having no density to train on. The step noise is drawn for every step either
    way, so a window does not change the noise of the steps inside it. ``sampler``: the flow SDE or ``cps``
    (:class:`StepRule`), whose last step draws no noise. ``record_means``: keep each step's mean too.
    """
    rule = StepRule(backbone, steps, eta, tuple(noise.shape[1:]), sampler=sampler)
    x = noise.float()
    latents, log_probs, means = [x], [], []
    for k, t in enumerate(tqdm(rule.timesteps, desc=progress, disable=progress is None, leave=False)):
        noisy = (stochastic is None or bool(stochastic[k])) and rule.noisy(k)
        mean, std = rule.distribution(k, x, guided_output(backbone, x, t, cond, uncond, guidance_scale, denoiser),
                                      stochastic=noisy)
        if record_means:
            means.append(mean)
        z = (torch.randn(x.shape, generator=generator, dtype=torch.float32) if step_noise is None
             else step_noise[:, k].float()).to(x.device)
        if noisy:
            x = mean + std.to(mean) * z
            log_probs.append(transition_log_prob(x, mean, std, sampler))
        else:
            x = mean
            log_probs.append(torch.zeros(x.shape[0], device=x.device))
        latents.append(x)
    return Trajectory(torch.stack(latents, dim=1), rule.timesteps.clone(), torch.stack(log_probs, dim=1),
                      torch.stack(means, dim=1) if record_means else None)


def step_distribution(backbone: Backbone, latents: Tensor, k: int | Tensor, cond: Conditioning, *, eta: float = 1.0,
                      guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                      denoiser: nn.Module | None = None, sampler: str = "sde") -> tuple[Tensor, Tensor]:
    """(mean (B, C, h, w), std (B,)) of recorded step k (one index, or one per trajectory) under ``denoiser``.

    ``latents`` are recorded trajectories (B, T + 1, C, h, w) (:attr:`Trajectory.latents`); the
    sampler's T steps and their timesteps follow from T and ``eta``. Differentiable when called with
    gradients enabled. One forward for the whole batch, each trajectory at its own step's timestep (the
    sampler's grid, on the CPU); only the step rule's arithmetic (scalar per step) goes step by step.
    """
    b, steps = latents.shape[0], latents.shape[1] - 1
    rule = StepRule(backbone, steps, eta, tuple(latents.shape[2:]), sampler=sampler)
    index = torch.as_tensor(k)
    step_of = (index.expand(b) if index.dim() == 0 else index).tolist()  # one host read: the rule is per step
    x = latents[torch.arange(b, device=latents.device), torch.tensor(step_of, device=latents.device)]
    output = guided_output(backbone, x, rule.timesteps[step_of], cond, uncond, guidance_scale, denoiser)
    means, stds = [None] * b, [None] * b
    for step in sorted(set(step_of)):
        members = [i for i, s in enumerate(step_of) if s == step]
        mean, std = rule.distribution(step, x[members], output[members])
        for j, i in enumerate(members):
            means[i], stds[i] = mean[j], std
    return torch.stack(means), torch.stack(stds).to(latents.device)


def step_log_prob(backbone: Backbone, latents: Tensor, k: int | Tensor, cond: Conditioning, *, eta: float = 1.0,
                  guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                  denoiser: nn.Module | None = None, sampler: str = "sde") -> Tensor:
    """(B,) log-probability of recorded step k (one index, or one per trajectory) under ``denoiser``
    (:func:`step_distribution`); differentiable when called with gradients enabled: the policy term of D3PO."""
    b = latents.shape[0]
    index = torch.as_tensor(k)
    step_of = (index.expand(b) if index.dim() == 0 else index).to(latents.device)
    mean, std = step_distribution(backbone, latents, k, cond, eta=eta, guidance_scale=guidance_scale, uncond=uncond,
                                  denoiser=denoiser, sampler=sampler)
    nxt = latents[torch.arange(b, device=latents.device), step_of + 1]
    return transition_log_prob(nxt, mean, std.view(-1, *([1] * (mean.dim() - 1))), sampler)
