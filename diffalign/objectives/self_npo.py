"""Self-NPO (Wang et al. 2025, "Self-NPO: Data-Free Diffusion Model Enhancement via Truncated
Diffusion Fine-Tuning", arXiv 2505.11777): a negative model learned from the model itself.

Diffusion-NPO trains a model that humans would *not* prefer and uses it in place of the
unconditional branch of classifier-free guidance (:mod:`diffalign.diffusion.negative_guidance`).
Self-NPO gets such a model without preference data, by teaching the model its own weak
predictions (truncated diffusion fine-tuning, as in the authors' ``Self-NPO/train.py``):

1. noise a clean latent x_0 to t_i, a point of an N-point DDIM grid (t_i = (i + 1) T / N - 1,
   i uniform), with the forward process x_t = a_t x_0 + b_t eps;
2. the teacher walks at most K DDIM moves (eta 0) down the grid from there, with guidance
   scale w_T (the authors use the unconditional prediction: w = -1 in their cond + w (cond -
   uncond), 0 in diffusers' convention), reaching x_e at t_e, and predicts x^_0(x_e, t_e), its
   Tweedie estimate of the clean latent;
3. x_e is noised further, consistently with the forward process, to s uniform in (t_e, T):
   x_s = a_s (x_e / a_e + sqrt(nsr_s^2 - nsr_e^2) z) with nsr = b / a, written here as
   x_s = (a_s / a_e) x_e + sqrt(b_s^2 - (a_s b_e / a_e)^2) z, which stays finite at pure noise (a_s = 0);
4. the student, conditioned on the caption, predicts x_0 from (x_s, s) and is regressed onto
   the teacher's x^_0 with the pseudo-Huber loss sqrt(d^2 + c^2) - c (c = 0.001; the authors
   omit the constant -c, which changes no gradient) or the squared error;
5. after every optimiser step the teacher moves towards the student by EMA (rate 0.999), so the
   model keeps learning from an ever weaker version of itself.

Defaults are the authors' SD1.5 recipe (train.sh): N = 25, K = 5, w = -1, EMA 0.999, Huber
c = 0.001, learning rate 1e-6, 1000 steps, full fine-tune. The teacher is a
:class:`~diffalign.diffusion.shadow.ShadowWeights` of the trained weights (only the LoRA weights
in a LoRA run), so it costs no second copy of the base; ``objective.options.teacher_ema=1.0`` keeps the
base itself as the teacher.

The authors' code is for DDPM-type models (a_t = sqrt(alpha-bar_t), b_t = sqrt(1 - alpha-bar_t)).
Written with (a_t, b_t) and the model's implied (x_0, eps) (:meth:`~diffalign.diffusion.schedule.Schedule.split`),
the same steps run on flow models (SD3/SD3.5, FLUX.1): a_t = 1 - sigma_t, b_t = sigma_t, the x_0
estimate of a velocity v is x_t - sigma_t v, a DDIM move is an Euler step of the probability-flow ODE
(:mod:`diffalign.diffusion.inversion`), and the grid runs over the flow schedule's training sigmas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffalign.diffusion import Backbone, Conditioning, schedule_for
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.objectives.base import Objective
from diffalign.config import ranged
from dataclasses import dataclass

if TYPE_CHECKING:
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


def truncation_grid(num_train_timesteps: int, points: int) -> Tensor:
    """The authors' DDIM grid: (1..N) * (T // N) - 1, e.g. 39, 79, ..., 999 for T = 1000, N = 25."""
    return torch.arange(1, points + 1) * (num_train_timesteps // points) - 1


def pseudo_huber(prediction: Tensor, target: Tensor, c: float) -> Tensor:
    """Mean of sqrt(d^2 + c^2) - c over all elements (the authors' Huber loss, minus its constant)."""
    return ((prediction.float() - target.float()).pow(2) + c * c).sqrt().mean() - c


@dataclass
class SelfNPOOptions:
    # the DDIM grid the teacher walks (points over the whole schedule)
    truncation_grid: int = ranged(25, "[1, inf)")
    # the number of teacher moves from the noised image
    truncated_steps: int = ranged(5, "[1, inf)")
    # the teacher's guidance scale (diffusers convention: 0 = the unconditional prediction, the authors' w = -1)
    teacher_guidance_scale: float = ranged(0.0, "[0, inf)")
    # the EMA rate of the teacher (1.0 = the frozen base model)
    teacher_ema: float = ranged(0.999, "[0, 1]")
    # the pseudo-Huber constant of objective.loss=huber
    huber_c: float = ranged(0.001, "(0, inf)")


class SelfNPO(Objective):
    """Truncated diffusion fine-tuning of a negative model; see the module docstring."""

    paper = "Wang et al. 2025, arXiv 2505.11777"

    dataset = "images"
    shadow_weights = True
    negative_model = True  # the trained weights are a negative model, used through negative guidance
    frozen_reference = False
    loss_kinds = ("regression",)
    own_losses = ("huber", "l2")

    Options = SelfNPOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.schedule = schedule_for(backbone.scheduler)
        self.num_timesteps = self.schedule.num_timesteps
        options = self.options_of(config)
        self.grid = truncation_grid(self.num_timesteps, options.truncation_grid)
        self.moves = options.truncated_steps
        self.guidance_scale = options.teacher_guidance_scale
        self.ema = options.teacher_ema
        self.loss, self.huber_c = config.loss, options.huber_c
        self.guides = self.guidance_scale != 1.0
        self.uncond = backbone.empty_prompt() if self.guides else None
        self.teacher: ShadowWeights | None = None

    # --- the trainer's hooks -------------------------------------------------------------
    def attach(self, denoiser: nn.Module) -> list[Any]:
        self.teacher = ShadowWeights(denoiser)
        return [self.teacher]

    def after_optimizer_step(self) -> None:
        self.teacher.update(self.ema)

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """Start index on the grid, forward noise, the extra noise of step 3 and its level u in [0, 1)."""
        return {
            "start": torch.randint(0, len(self.grid), (n,), generator=generator),
            "noise": torch.randn((n, *latent_shape), generator=generator),
            "renoise": torch.randn((n, *latent_shape), generator=generator),
            "level": torch.rand((n,), generator=generator),
        }

    # --- the maths -----------------------------------------------------------------------
    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, b_t) as columns broadcasting against ``like``."""
        return tuple(c.to(like).view(-1, *([1] * (like.dim() - 1))) for c in self.schedule.coefficients(t))

    def _eps_and_x0(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The (epsilon, x_0) pair a model output implies at (x, t)."""
        x0, eps = self.schedule.split(output, x, t)
        return eps, x0

    def _predict(self, backbone: Backbone, x: Tensor, t: Tensor, cond: Conditioning, net: nn.Module) -> Tensor:
        return backbone.predict(x, self.schedule.model_timesteps(t), cond, denoiser=net)

    def _teacher(self, backbone: Backbone, x: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """The teacher's guided (epsilon, x_0) at (x, t): uncond + w (cond - uncond)."""
        net = self.teacher.denoiser()
        if not self.guides:
            return self._eps_and_x0(self._predict(backbone, x, t, cond, net), x, t)
        uncond = None if self.uncond is None else self.uncond.to(x.device).repeat_items(x.shape[0])
        both = self._predict(backbone, torch.cat([x, x]), torch.cat([t, t]), cond.guidance_batch(uncond), net)
        unconditional, conditional = both.float().chunk(2)
        return self._eps_and_x0(backbone.combine_guidance(unconditional, conditional, self.guidance_scale), x, t)

    @torch.no_grad()
    def truncated_rollout(self, backbone: Backbone, x0: Tensor, cond: Conditioning,
                          randomness: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-2: (x_e, t_e, the teacher's x^_0 at x_e). Item i makes min(K, start_i + 1) moves;
        moving below the grid's first point lands on t = 0, as in the authors' solver."""
        start = randomness["start"].to(x0.device)
        grid = self.grid.to(x0.device)
        levels = lambda index: torch.where(index >= 0, grid[index.clamp(min=0)], torch.zeros_like(index))  # noqa: E731
        t = grid[start]
        a, b = self._coefficients(t, x0)
        x = a * x0 + b * randomness["noise"].to(x0)
        moves = torch.clamp(start + 1, max=self.moves)
        for move in range(self.moves):
            active = (moves > move).nonzero().squeeze(1)
            if len(active) == 0:
                break
            here = t[active]
            eps, x0_hat = self._teacher(backbone, x[active], here, cond[active])
            below = levels(start[active] - move - 1)
            a, b = self._coefficients(below, x0_hat)
            x[active] = a * x0_hat + b * eps
            t[active] = below
        _, target = self._teacher(backbone, x, t, cond)
        return x, t, target

    def student_timesteps(self, t_end: Tensor, level: Tensor) -> Tensor:
        """Step 3's s, uniform over t_end + 1 .. T - 1 (the authors' randint(1, T - 1 - t_end + 1))."""
        span = (self.num_timesteps - 1 - t_end).clamp(min=1)
        return (t_end + 1 + (level.to(t_end.device) * span).long().clamp(max=span - 1)).clamp(max=self.num_timesteps - 1)

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean regression loss over the batch and detached metrics; ``latents`` (B, 1, C, h, w)."""
        x0 = latents[:, 0].float()
        x_end, t_end, target = self.truncated_rollout(backbone, x0, cond, randomness)
        s = self.student_timesteps(t_end, randomness["level"])
        (a_end, b_end), (a_s, b_s) = self._coefficients(t_end, x0), self._coefficients(s, x0)
        carried = a_s / a_end  # x_end's noise, b_end, becomes carried * b_end at s; z makes up the rest
        x_s = carried * x_end + (b_s**2 - (carried * b_end) ** 2).clamp(min=0).sqrt() * randomness["renoise"].to(x0)
        dtype = next(policy.parameters()).dtype
        output = self._predict(backbone, x_s.to(dtype), s, cond.to(dtype=dtype), policy)
        _, prediction = self._eps_and_x0(output, x_s, s)
        if self.loss == "huber":
            loss = pseudo_huber(prediction, target, self.huber_c)
        else:
            loss = (prediction - target).pow(2).mean()
        metrics = {"teacher_t": t_end.float().mean(), "student_t": s.float().mean(),
                   "mse_to_teacher": (prediction.detach() - target).pow(2).mean()}
        return loss, metrics
