"""Deterministic DDIM sampling and its inversions (plain and ReNoise), on diffusion and flow models.

Write every supported schedule as ``x_t = a_t x_0 + b_t eps`` (DDPM: a = sqrt(alpha-bar),
b = sqrt(1 - alpha-bar); rectified flow: a = 1 - sigma, b = sigma). A model output at x_t gives
the pair (x0, eps) it implies (:meth:`~diffalign.diffusion.schedule.Schedule.split`), and DDIM
(eta = 0; Song et al. 2021, Eq. 12) moves to any other timestep s by keeping both:

    x_s = a_s x0 + b_s eps.

On a flow model with velocity v, x0 = x_t - sigma_t v and eps = x_t + (1 - sigma_t) v, so the move is
x_s = x_t + (sigma_s - sigma_t) v: exactly the Euler step of the probability-flow ODE
dx / dsigma = v that FlowMatchEulerDiscreteScheduler takes. One walk therefore serves both families.

Sampling runs it from noise down to the clean end (a = 1, b = 0); inversion runs it upwards from a
clean latent, approximating the unknown prediction at x_{t+1} by the one at x_t (Dhariwal & Nichol
2021; the inversion InPO uses; on a flow model, the explicit Euler inversion of the ODE). ReNoise
(Garibi et al. 2024, "ReNoise: Real Image Inversion Through Iterative Noising", Alg. 1) removes most
of that approximation error: each upward step is repeated, re-evaluating the model at the current
estimate of x_{t+1}, and the step uses the mean of the later estimates. SmPO estimates its
trajectories this way; ReNoise was introduced for few-step models, where one Euler step is large.

The grid is the schedule's "leading" one (:meth:`~diffalign.diffusion.schedule.Schedule.grid`),
over training timesteps that grow with the noise on both families. Conditioning is the backbone's,
with classifier-free guidance scale 1 (the conditional model), which is what makes inversion
followed by sampling reproduce the image.
"""

from __future__ import annotations

import torch

from diffalign.diffusion.backbones import Backbone, Conditioning
from diffalign.diffusion.schedule import Schedule, schedule_for
from diffalign.sharded import most_over_processes

Tensor = torch.Tensor


def _column(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like).view(-1, *([1] * (like.dim() - 1)))


def _epsilon_at(backbone: Backbone, schedule: Schedule, x: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
    """The eps the denoiser implies at (x, t), each item at its own timestep."""
    out = backbone.predict(x, schedule.model_timesteps(timesteps), cond)
    return schedule.split(out, x, timesteps)[1]


def _move(x: Tensor, eps: Tensor, start: tuple[Tensor, Tensor], end: tuple[Tensor, Tensor]) -> Tensor:
    """The DDIM move from coefficients ``start`` = (a, b) to ``end`` keeping (x0, eps)."""
    x0 = (x - start[1] * eps) / start[0]
    return end[0] * x0 + end[1] * eps


def _renoise(backbone: Backbone, schedule: Schedule, x: Tensor, eps: Tensor, start, end, t_to: Tensor,
             cond: Conditioning, iterations: int, average_from: int) -> Tensor:
    """The epsilon of one upward step after ``iterations`` ReNoise refinements (Alg. 1).

    Estimate 0 is ``eps``, taken at the step's start; estimate k re-evaluates the denoiser at
    the point estimate k-1 leads to, at the destination timesteps ``t_to``. Returns the mean of
    estimates ``average_from`` .. ``iterations`` (just ``eps`` when ``iterations`` is 0).
    """
    estimates = [eps]
    for _ in range(iterations):
        estimates.append(_epsilon_at(backbone, schedule, _move(x, estimates[-1], start, end), t_to, cond))
    return torch.stack(estimates[min(average_from, iterations):]).mean(dim=0)


def _coefficients(schedule: Schedule, t: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) of the timesteps ``t`` as columns like ``like``; t = None is the clean end (1, 0)."""
    if t is None:
        return torch.ones((), dtype=like.dtype, device=like.device), torch.zeros((), dtype=like.dtype, device=like.device)
    a, b = schedule.coefficients(t.to(like.device))
    return _column(a, like), _column(b, like)


def _full(t: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), t, device=like.device, dtype=torch.long)


@torch.no_grad()
def ddim_sample(backbone: Backbone, noise: Tensor, cond: Conditioning, *, steps: int = 50) -> Tensor:
    """Deterministic DDIM (eta = 0; Euler on a flow model) from ``noise`` at the last of ``steps`` grid points
    down to a clean latent."""
    schedule = schedule_for(backbone.scheduler)
    grid = schedule.grid(steps)
    x = noise.float()
    for i in reversed(range(steps)):
        t = _full(grid[i], x)
        s = _full(grid[i - 1], x) if i > 0 else None
        eps = _epsilon_at(backbone, schedule, x, t, cond)
        x = _move(x, eps, _coefficients(schedule, t, x), _coefficients(schedule, s, x))
    return x


@torch.no_grad()
def ddim_invert(backbone: Backbone, latents: Tensor, cond: Conditioning, *, steps: int = 50,
                renoise_iterations: int = 0, renoise_average_from: int = 1) -> list[Tensor]:
    """Invert clean ``latents`` to noise along the DDIM trajectory; returns [x_0, x_t1, ..., x_tN].

    ``renoise_iterations`` > 0 turns on ReNoise: each step is re-done that many times with
    epsilon evaluated at the newest estimate of the next latent, and the step uses the mean of
    the estimates from iteration ``renoise_average_from`` on (the paper averages the later ones;
    0 includes the plain DDIM estimate, as SmPO's code does).
    """
    schedule = schedule_for(backbone.scheduler)
    x = latents.float()
    trajectory = [x]
    previous: Tensor | None = None
    for point in schedule.grid(steps):
        t = _full(point, x)
        start, end = _coefficients(schedule, previous, x), _coefficients(schedule, t, x)
        eps = _epsilon_at(backbone, schedule, x, previous if previous is not None else _full(0, x), cond)
        eps = _renoise(backbone, schedule, x, eps, start, end, t, cond, renoise_iterations, renoise_average_from)
        x = _move(x, eps, start, end)
        trajectory.append(x)
        previous = t
    return trajectory


@torch.no_grad()
def ddim_invert_to(backbone: Backbone, latents: Tensor, cond: Conditioning, timesteps: Tensor, *, steps: int = 10,
                   eta: float = 0.0, renoise_iterations: int = 0, renoise_average_from: int = 1,
                   generator: torch.Generator | None = None) -> Tensor:
    """Each clean latent DDIM-inverted up to its own timestep in ``timesteps`` (InPO's x_t).

    Item i walks the points of the ``steps``-point grid below ``timesteps[i]``, then one last
    DDIM move lands exactly on it. All items move in lockstep, so each move is one batched
    forward over the items still on their way. ``eta`` > 0 adds ``eta * sigma * z`` after each
    move but the first, sigma being the DDPM posterior standard deviation between the two
    timesteps (InPO's optional stochastic inversion, 0.1 in the authors' code); ``generator``
    draws z. On a flow model, whose x_t is the variance-preserving one scaled by
    sqrt(a_t^2 + b_t^2), sigma is the same deviation computed at alpha-bar = a^2 / (a^2 + b^2) and
    scaled alike. ``renoise_iterations`` refines each move as in :func:`ddim_invert` (SmPO's x_t).
    """
    schedule = schedule_for(backbone.scheduler)
    grid = schedule.grid(steps)
    paths = [[g for g in grid if g < t] + [t] for t in timesteps.tolist()]  # one host read, not one per item
    x = latents.float().clone()
    # under FSDP2 every process makes as many moves as the longest walk of any process (padding: item 0's last move)
    for move in range(most_over_processes(max(len(p) for p in paths), backbone.denoiser)):
        active = [i for i, p in enumerate(paths) if move < len(p)]
        padding = not active
        at = {i: min(move, len(paths[i]) - 1) for i in active or [0]}
        active = active or [0]
        source = torch.tensor([paths[i][at[i] - 1] if at[i] else 0 for i in active], device=x.device)
        target = torch.tensor([paths[i][at[i]] for i in active], device=x.device)
        x_active, cond_active = x[active], cond[active]
        start = _coefficients(schedule, source if move else None, x_active)
        end = _coefficients(schedule, target, x_active)
        eps = _epsilon_at(backbone, schedule, x_active, source, cond_active)
        eps = _renoise(backbone, schedule, x_active, eps, start, end, target, cond_active, renoise_iterations,
                       renoise_average_from)
        if padding:
            continue
        moved = _move(x_active, eps, start, end)
        if eta > 0 and move:
            moved = moved + eta * _posterior_std(start, end) * torch.randn(
                moved.shape, generator=generator, dtype=moved.dtype).to(moved.device)
        x[active] = moved
    return x


def _posterior_std(start: tuple[Tensor, Tensor], end: tuple[Tensor, Tensor]) -> Tensor:
    """DDPM's posterior standard deviation between two levels (Song et al. 2021, Eq. 16 at eta 1), in the
    scale of x at ``end``: for DDPM ``sqrt((1 - a_from) / (1 - a_to) (1 - a_to / a_from))`` in alpha-bars."""
    scale = (end[0] ** 2 + end[1] ** 2).sqrt()
    a_from = start[0] ** 2 / (start[0] ** 2 + start[1] ** 2)
    a_to = end[0] ** 2 / (end[0] ** 2 + end[1] ** 2)
    return scale * ((1 - a_from) / (1 - a_to) * (1 - a_to / a_from)).clamp(min=0).sqrt()
