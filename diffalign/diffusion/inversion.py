"""Deterministic DDIM sampling and its inversions: plain DDIM inversion and ReNoise.

With alpha-bar a_t, an epsilon prediction e at x_t gives the clean estimate
x0 = (x_t - sqrt(1 - a_t) e) / sqrt(a_t), and DDIM (eta = 0; Song et al. 2021, Eq. 12) moves
to any other timestep s with

    x_s = sqrt(a_s) x0 + sqrt(1 - a_s) e.

Sampling runs it from noise down to t = 0; inversion runs it upwards from a clean latent,
approximating the unknown e(x_{t+1}) by e(x_t) (Dhariwal & Nichol 2021; the inversion InPO
uses). ReNoise (Garibi et al. 2024, "ReNoise: Real Image Inversion Through Iterative
Noising", Alg. 1) removes most of that approximation error: each upward step is repeated,
re-evaluating e at the current estimate of x_{t+1}, and the step uses the mean of the later
estimates. SmPO estimates its trajectories this way.

Both work on any epsilon- or v-prediction backbone (:class:`~diffalign.diffusion.Backbone`),
with the backbone's conditioning and classifier-free guidance scale 1 (the conditional model),
which is what makes inversion followed by sampling reproduce the image.
"""

from __future__ import annotations

import torch

from diffalign.diffusion.backbones import Backbone, Conditioning

Tensor = torch.Tensor


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced training timesteps, increasing from 0 (diffusers' "leading" spacing)."""
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps)]


def _epsilon(backbone: Backbone, x: Tensor, t: int, cond: Conditioning) -> Tensor:
    """The epsilon the denoiser implies at (x, t), for epsilon and v prediction."""
    return _epsilon_at(backbone, x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)


def _epsilon_at(backbone: Backbone, x: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
    """As :func:`_epsilon`, each item at its own timestep."""
    out = backbone.predict(x, timesteps, cond).float()
    if backbone.scheduler.config.prediction_type == "v_prediction":
        a = backbone.scheduler.alphas_cumprod.to(x)[timesteps].view(-1, *([1] * (x.dim() - 1)))
        return a.sqrt() * out + (1 - a).sqrt() * x
    return out


def _move(x: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor) -> Tensor:
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def _renoise(backbone: Backbone, x: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor, t_to: Tensor,
             cond: Conditioning, iterations: int, average_from: int) -> Tensor:
    """The epsilon of one upward step after ``iterations`` ReNoise refinements (Alg. 1).

    Estimate 0 is ``eps``, taken at the step's start; estimate k re-evaluates the denoiser at
    the point estimate k-1 leads to, at the destination timesteps ``t_to``. Returns the mean of
    estimates ``average_from`` .. ``iterations`` (just ``eps`` when ``iterations`` is 0).
    """
    estimates = [eps]
    for _ in range(iterations):
        estimates.append(_epsilon_at(backbone, _move(x, estimates[-1], a_from, a_to), t_to, cond))
    return torch.stack(estimates[min(average_from, iterations):]).mean(dim=0)


def _alpha(backbone: Backbone, t: int | None, like: Tensor) -> Tensor:
    """alpha-bar at t; t = None is the clean end (alpha-bar 1)."""
    if t is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return backbone.scheduler.alphas_cumprod[t].to(like)


@torch.no_grad()
def ddim_sample(backbone: Backbone, noise: Tensor, cond: Conditioning, *, steps: int = 50) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``noise`` at the last of ``steps`` timesteps down to a clean latent."""
    timesteps = ddim_timesteps(backbone.scheduler.config.num_train_timesteps, steps)
    x = noise.float()
    for i in reversed(range(steps)):
        t, s = timesteps[i], (timesteps[i - 1] if i > 0 else None)
        x = _move(x, _epsilon(backbone, x, t, cond), _alpha(backbone, t, x), _alpha(backbone, s, x))
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
    timesteps = ddim_timesteps(backbone.scheduler.config.num_train_timesteps, steps)
    x = latents.float()
    trajectory = [x]
    previous: int | None = None
    for t in timesteps:
        a_from, a_to = _alpha(backbone, previous, x), _alpha(backbone, t, x)
        eps = _epsilon(backbone, x, previous if previous is not None else 0, cond)
        eps = _renoise(backbone, x, eps, a_from, a_to, torch.full((x.shape[0],), t, device=x.device), cond,
                       renoise_iterations, renoise_average_from)
        x = _move(x, eps, a_from, a_to)
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
    draws z. ``renoise_iterations`` refines each move as in :func:`ddim_invert` (SmPO's x_t).
    """
    grid = ddim_timesteps(backbone.scheduler.config.num_train_timesteps, steps)
    paths = [[g for g in grid if g < t] + [t] for t in timesteps.tolist()]  # one host read, not one per item
    alphas = backbone.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    x = latents.float().clone()
    for move in range(max(len(p) for p in paths)):
        active = [i for i, p in enumerate(paths) if move < len(p)]
        source = torch.tensor([paths[i][move - 1] if move else 0 for i in active], device=x.device)
        target = torch.tensor([paths[i][move] for i in active], device=x.device)
        a_from = alphas[source] if move else torch.ones(len(active), device=x.device)
        a_to = alphas[target]
        x_active, cond_active = x[active], cond[active]
        shape = (-1,) + (1,) * (x.dim() - 1)
        a_from, a_to = a_from.view(shape), a_to.view(shape)
        eps = _epsilon_at(backbone, x_active, source, cond_active)
        eps = _renoise(backbone, x_active, eps, a_from, a_to, target, cond_active, renoise_iterations,
                       renoise_average_from)
        moved = _move(x_active, eps, a_from, a_to)
        if eta > 0 and move:
            variance = ((1 - a_from) / (1 - a_to) * (1 - a_to / a_from)).clamp(min=0)
            z = torch.randn(moved.shape, generator=generator, dtype=moved.dtype).to(moved.device)
            moved = moved + eta * variance.sqrt() * z
        x[active] = moved
    return x
