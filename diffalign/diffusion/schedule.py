"""Noising, prediction targets, loss weights and timestep sampling, from the model's scheduler.

Two families cover the supported backbones:

- :class:`DiffusionSchedule` (DDPM-type: SD 1.x/2.x, SDXL, PixArt):
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``a_t`` the scheduler's alphas_cumprod;
  target eps (epsilon), ``sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (v_prediction) or x_0 (sample).
- :class:`FlowSchedule` (rectified flow: SD3/SD3.5, FLUX.1): ``x_t = (1 - sigma) x_0 + sigma eps``
  with the scheduler's (shifted) sigmas; target ``eps - x_0``; the transformer sees ``sigma * 1000``.

Both are ``x_t = a_t x_0 + b_t eps`` (:meth:`Schedule.coefficients`), and any model output gives
back the pair (x_0, eps) it implies at x_t (:meth:`Schedule.split`): the two facts the inversion
and truncated-sampling methods are written in, so they run on either family.

A timestep is an integer index ``t`` in [0, num_train_timesteps) in both, and in both a larger
``t`` is noisier; the schedule maps it to what the denoiser expects. Samplers draw ``u`` in
[0, 1) (uniform, logit-normal or SD3's mode sampling, via diffusers.training_utils) and restrict
it to a fraction range; on a flow model ``u`` is then SD3's noise level t before the shift
(Esser et al. 2024, Eq. 19-20: sigma = shift t / (1 + (shift - 1) t)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from diffalign.errors import UserError

Tensor = torch.Tensor

SAMPLERS = ("uniform", "logit_normal", "mode")


@dataclass(frozen=True)
class TimestepSampler:
    """How training timesteps are drawn.

    Attributes:
        kind: "uniform", "logit_normal" (SD3's default, Esser et al. 2024 Eq. 19) or "mode".
        logit_mean, logit_std: parameters of the logit-normal.
        mode_scale: scale of the mode sampler.
        t_range: the fraction [lo, hi) of the schedule to draw from, e.g. (0.0, 0.5) keeps
            the less noisy half, on either family.
    """

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    t_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise UserError(f"unknown timestep sampler {self.kind!r}; choose one of {', '.join(SAMPLERS)}")
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(f"timestep range {self.t_range} must satisfy 0 <= lo < hi <= 1")

    def sample(self, n: int, num_timesteps: int, generator: torch.Generator | None = None) -> Tensor:
        """n integer timesteps in the range, on the CPU."""
        if self.kind == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = compute_density_for_timestep_sampling(
                self.kind, n, logit_mean=self.logit_mean, logit_std=self.logit_std,
                mode_scale=self.mode_scale, generator=generator,
            )
        lo, hi = self.t_range
        lo_i, hi_i = int(lo * num_timesteps), max(int(hi * num_timesteps), int(lo * num_timesteps) + 1)
        return (lo_i + u * (hi_i - lo_i)).long().clamp(lo_i, hi_i - 1)


class Schedule:
    """Common interface; see the module docstring."""

    num_timesteps: int
    prediction_type: str

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def model_timesteps(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_weight(self, t: Tensor, weighting: str) -> Tensor:
        raise NotImplementedError

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, b_t), each (N,) float32, of ``x_t = a_t x_0 + b_t eps`` at integer timesteps ``t``."""
        raise NotImplementedError

    def split(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The (x_0, eps) that the model's ``output`` at (x, t) implies, in float32."""
        raise NotImplementedError

    def grid(self, steps: int) -> list[int]:
        """``steps`` evenly spaced timesteps, increasing from 0 (diffusers' "leading" DDIM spacing): the grid
        that inversion and truncated sampling walk."""
        ratio = self.num_timesteps // steps
        return [i * ratio for i in range(steps)]


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DiffusionSchedule(Schedule):
    """DDPM-type noising with the scheduler's alphas_cumprod (epsilon / v / sample targets)."""

    WEIGHTINGS = ("uniform", "min_snr")

    def __init__(self, scheduler, min_snr_gamma: float = 5.0) -> None:
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        self.min_snr_gamma = min_snr_gamma
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod.to(t.device)[t]
        return _bcast(a.sqrt(), like), _bcast((1 - a).sqrt(), like)

    def add_noise(self, x0, noise, t):
        signal, sigma = self._coefs(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0, noise, t):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        signal, sigma = self._coefs(t, x0)
        return signal * noise - sigma * x0

    def model_timesteps(self, t):
        return t

    def coefficients(self, t):
        a = self.alphas_cumprod.to(t.device)[t]
        return a.sqrt(), (1 - a).sqrt()

    def split(self, output, x, t):
        """Epsilon, v (``v = a eps - b x_0``, Salimans & Ho 2022) or x_0 prediction -> (x_0, eps)."""
        a, b = (_bcast(c, x) for c in self.coefficients(t))
        output, x = output.float(), x.float()
        if self.prediction_type == "epsilon":
            return (x - b * output) / a, output
        if self.prediction_type == "v_prediction":
            return a * x - b * output, a * output + b * x
        return output, (x - a * output) / b

    def snr(self, t: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def loss_weight(self, t, weighting="uniform"):
        """Per-sample weight of the squared error: 1, or Min-SNR-gamma (Hang et al. 2023, Eq. 9)."""
        if weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        if weighting == "min_snr":
            snr = self.snr(t)
            clipped = snr.clamp(max=self.min_snr_gamma)
            if self.prediction_type == "epsilon":
                return clipped / snr
            if self.prediction_type == "v_prediction":
                return clipped / (snr + 1)
            return clipped
        raise UserError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(self.WEIGHTINGS)}")


class FlowSchedule(Schedule):
    """Rectified-flow noising with the scheduler's (shifted) sigmas, as SD3 and FLUX.1 train.

    The training grid is the scheduler's: SD3's sigmas shifted by ``shift`` (3.0), FLUX.1's unshifted
    (its scheduler shifts by resolution only when sampling, ``use_dynamic_shifting``), as diffusers'
    training scripts use them. Index t holds the t-th smallest sigma, so that t grows with the noise as
    a DDPM timestep does; diffusers' scripts index the same grid from the noisy end.
    """

    WEIGHTINGS = ("uniform", "sigma_sqrt", "cosmap")

    def __init__(self, scheduler) -> None:
        # a fresh copy: a scheduler used for sampling has had set_timesteps() rewrite its grid
        scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = "flow"
        # index i <-> (sigma_i, timestep_i), increasing noise: the scheduler's training grid read from its clean end
        self.sigmas = scheduler.sigmas[: self.num_timesteps].flip(0).float()
        self.timesteps = scheduler.timesteps[: self.num_timesteps].flip(0).float()

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigmas.to(t.device)[t]

    def add_noise(self, x0, noise, t):
        s = _bcast(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def model_timesteps(self, t):
        return self.timesteps.to(t.device)[t]

    def coefficients(self, t):
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def split(self, output, x, t):
        """Velocity v = eps - x_0 at x_t = (1 - sigma) x_0 + sigma eps -> x_0 = x_t - sigma v, eps = x_t + (1 - sigma) v."""
        sigma = _bcast(self.sigma(t), x)
        output, x = output.float(), x.float()
        return x - sigma * output, x + (1 - sigma) * output

    def loss_weight(self, t, weighting="uniform"):
        """SD3's weightings (diffusers.training_utils.compute_loss_weighting_for_sd3)."""
        if weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        if weighting in ("sigma_sqrt", "cosmap"):
            return compute_loss_weighting_for_sd3(weighting, self.sigma(t)).float()
        raise UserError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(self.WEIGHTINGS)}")


def schedule_for(scheduler, **kwargs) -> Schedule:
    """The schedule matching a diffusers scheduler's config."""
    if "FlowMatch" in type(scheduler).__name__:
        return FlowSchedule(scheduler)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UserError(f"{type(scheduler).__name__} has neither alphas_cumprod nor flow-matching sigmas")
    return DiffusionSchedule(scheduler, **kwargs)
