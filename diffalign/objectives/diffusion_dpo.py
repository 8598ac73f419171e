"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), through any pairwise core loss.

Paper, Eq. 14: with x^w, x^l noised at one shared t and eps,

    L = -log sigma( -beta T w(lambda_t) [ ||eps - eps_theta(x^w_t)||^2 - ||eps - eps_ref(x^w_t)||^2
                                      - (||eps - eps_theta(x^l_t)||^2 - ||eps - eps_ref(x^l_t)||^2) ] )

With the score s(x) = -w(t) * mean squared error (:mod:`diffalign.diffusion.likelihood`)
this is exactly ``losses.dpo(s_theta(x^w), s_theta(x^l), s_ref(x^w), s_ref(x^l), beta)``;
any other pairwise loss (ipo, hinge, robust, ...) or soft-label loss is one config key away.

Constants: the official code computes ``-0.5 * beta * (model_diff - ref_diff)`` with
beta = 5000 (SD1.5); diffusers' port computes ``beta * (ref_diff - model_diff)`` with 2500.
Both equal ``dpo`` here with beta = 2500 (the 0.5 is folded in); errors are per-pixel means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffalign import losses
from diffalign.diffusion import Backbone, Conditioning, TimestepSampler, group_scores, noised_group, schedule_for
from diffalign.train.config import ObjectiveConfig

Tensor = torch.Tensor


class DiffusionDPO:
    """Offline pairwise objective on (winner, loser) latents sharing timestep and noise.

    Declares what the trainer must provide: a reference (unless the loss is reference-free)
    and pairs of images; no sampling during training.
    """

    items_per_prompt = 2
    online = False

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.spec = losses.spec(config.loss)
        if self.spec.kind not in ("pairwise", "soft-label", "reference-free", "regulariser"):
            raise ValueError(f"diffusion_dpo takes a pairwise loss; {config.loss!r} is {self.spec.kind}")
        self.needs_reference = self.spec.needs_reference
        self.beta = config.beta
        self.options = dict(config.loss_options)
        self.weighting = config.weighting
        self.schedule = schedule_for(backbone.scheduler)
        self.sampler = TimestepSampler(config.timestep_sampler, t_range=tuple(config.t_range))

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """One pair's shared timestep and noise, from the pair's own generator."""
        return {
            "timesteps": self.sampler.sample(n, self.schedule.num_timesteps, generator),
            "noise": torch.randn((n, *latent_shape), generator=generator),
        }

    def __call__(
        self,
        backbone: Backbone,
        latents: Tensor,
        cond: Conditioning,
        randomness: dict[str, Tensor],
        policy: nn.Module,
        reference: nn.Module | None,
        preference: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Mean loss over the pairs and detached metrics.

        Args:
            latents: (B, 2, C, h, w), winner first.
            randomness: shared ``timesteps`` (B,) and ``noise`` (B, C, h, w) from :meth:`draw`.
            policy: the trained denoiser as the trainer runs it (possibly DDP-wrapped).
            reference: a frozen reference denoiser, or None for the LoRA-disabled base.
            preference: (B,) P(winner preferred), for soft-label losses.
        """
        group = noised_group(
            latents, cond, self.schedule, timesteps=randomness["timesteps"], noise=randomness["noise"],
            weighting=self.weighting,
        )
        scores, ref = group_scores(
            backbone, group, policy=policy, reference=reference, need_reference=self.needs_reference
        )
        rc, rr = (None, None) if ref is None else (ref[:, 0], ref[:, 1])
        options = dict(self.options)
        if self.spec.kind == "soft-label":
            options["preference"] = preference if preference is not None else torch.ones_like(scores[:, 0])
        per_pair = self.spec.fn(scores[:, 0], scores[:, 1], rc, rr, beta=self.beta, **options)
        metrics = {"raw_model_loss": -scores.detach().mean()}
        if ref is not None:
            metrics.update(losses.preference_metrics(scores[:, 0], scores[:, 1], rc, rr, beta=self.beta))
            metrics["ref_loss"] = -ref.mean()
        return per_pair.mean(), metrics
