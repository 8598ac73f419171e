"""What every offline objective shares: groups of K latents per prompt (a pair, a ranked list)
noised with one timestep and one noise per group, scored by the policy and the reference with
the denoising-likelihood proxy (:mod:`diffalign.diffusion.likelihood`), then handed to a core loss.

A subclass names the loss kinds it accepts and turns (B, K) scores into a per-group loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from diffalign import losses
from diffalign.losses.noisy_labels import LabelReliability, lcpo_posterior
from diffalign.losses.unpaired import RewardShift, kto_kl_baseline
from diffalign.errors import UserError
from diffalign.objectives.base import Objective
from diffalign.diffusion import (
    Backbone,
    Conditioning,
    NoisedGroup,
    TimestepSampler,
    group_scores,
    noised_group,
    schedule_for,
)

if TYPE_CHECKING:  # the trainer imports the objectives; only the type hint goes the other way
    from diffalign.config import ObjectiveConfig

Tensor = torch.Tensor


def served_range(t_range: Sequence[float], backbone: Backbone) -> tuple[float, float]:
    """``objective.t_range`` narrowed to the share of the schedule the trained denoiser serves (one expert of a
    two-expert model trains on its own timesteps only)."""
    share = backbone.timestep_share()
    lo, hi = max(t_range[0], share[0]), min(t_range[1], share[1])
    if lo >= hi:
        raise UserError(f"objective.t_range={list(t_range)} shares no timestep with the trained expert's "
                        f"{[round(v, 3) for v in share]} of the schedule")
    return lo, hi


class NoisedDataObjective(Objective):
    """What an objective that trains on the data's clean latents needs to noise them: each group's timestep (from
    ``objective.timestep_sampler`` over ``objective.t_range``) and noise, drawn per group so a resumed run draws the
    same, and the group noised with them by the forward process (the offline objectives, distillation)."""

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.weighting = config.weighting
        self.schedule = schedule_for(backbone.scheduler)
        self.sampler = TimestepSampler(config.timestep_sampler, t_range=served_range(config.t_range, backbone))

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """One group's shared timestep and noise, from the group's own generator."""
        return {
            "timesteps": self.sampler.sample(n, self.schedule.num_timesteps, generator),
            "noise": torch.randn((n, *latent_shape), generator=generator),
        }

    def noise(self, backbone: Backbone, latents: Tensor, cond: Conditioning,
              randomness: dict[str, Tensor]) -> NoisedGroup:
        """Where each item sits on its trajectory: by default x_t from the group's shared random noise."""
        return noised_group(latents, cond, self.schedule, timesteps=randomness["timesteps"],
                            noise=randomness["noise"], weighting=self.weighting)


class OfflineDenoisingObjective(NoisedDataObjective):
    """Base of the offline objectives: no sampling during training; see the module docstring."""

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.spec = losses.spec(config.loss)
        if self.spec.kind not in self.loss_kinds:
            raise ValueError(f"{type(self).__name__} takes a {' or '.join(self.loss_kinds)} loss; "
                             f"{config.loss!r} is {self.spec.kind}")
        self.needs_reference = self.spec.needs_reference
        self.beta = config.beta
        self.options = dict(config.loss_options)
        NoisedDataObjective.__init__(self, config, backbone)
        # BCO's reward shift delta (Jung et al. 2024, Sec. 3.2): unless loss_options.delta fixes it, the running
        # mean of the implicit rewards over the run, as TRL's BCOTrainer keeps it; saved with every checkpoint
        self.reward_shift = RewardShift() if self.spec.name == "bco" and "delta" not in self.options else None
        # LCPO's label reliability eta (Cao et al. 2025): unless loss_options.reliability fixes it, re-estimated
        # each step from the batch's posteriors that its labels are right; saved with every checkpoint
        self.label_reliability = (LabelReliability() if self.spec.name == "lcpo" and "reliability" not in self.options
                                  else None)

    def attach(self, denoiser: nn.Module) -> list[Any]:
        """The running statistics a loss keeps (BCO's reward shift, LCPO's reliability) go into the checkpoints."""
        return [state for state in (self.reward_shift, self.label_reliability) if state is not None]

    def _mean_reward(self, policy: Tensor, reference: Tensor) -> Tensor:
        """The mean implicit reward r = s_policy - s_ref over every item of the global batch, detached."""
        return self.mean_over_processes((policy - reference).detach().float().mean())

    def reference_point(self, policy: Tensor, reference: Tensor) -> Tensor:
        """KTO's z_0 (Eq. 8): max(0, mean implicit reward) over the global batch, detached. Diffusion-KTO's
        code reduces it over the GPUs (``accelerator.reduce(kl_gpu, reduction="mean")``)."""
        return kto_kl_baseline(fallback=[(policy - reference).float()], mean_over_processes=self.mean_over_processes)

    def loss_options(self, policy: Tensor, reference: Tensor | None) -> dict[str, Any]:
        """The core loss's options for this batch: the config's ``loss_options`` plus those an unpaired loss
        takes from the implicit rewards of the whole batch (every item, every process), KTO's reference point
        and BCO's running reward shift, and LCPO's reliability (this step's E-step uses the value before the
        step's own M-step moves it)."""
        if reference is not None and self.spec.name == "kto":
            return {**self.options, "kl": self.reference_point(policy, reference)}
        if reference is not None and self.reward_shift is not None:
            delta = self.reward_shift.update(self.beta * self._mean_reward(policy, reference)[None])
            return {**self.options, "delta": delta}
        if reference is not None and self.label_reliability is not None:
            reliability = self.label_reliability.value.to(policy.device)
            posterior = lcpo_posterior(policy[:, 0], policy[:, -1], reference[:, 0], reference[:, -1], beta=self.beta,
                                       reliability=reliability, base=self.options.get("base", "dpo"))
            self.label_reliability.update(self.mean_over_processes(posterior.mean()))
            return {**self.options, "reliability": reliability}
        return dict(self.options)

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        """(B,) loss from (B, K) policy and reference scores; see the subclasses."""
        raise NotImplementedError

    def scored_inputs(self, backbone: Backbone, group: NoisedGroup) -> dict[str, Tensor]:
        """Per-group inputs of the core loss scored on the same noised group, such as INPO's previous-iterate
        scores (default none)."""
        return {}

    def __call__(
        self,
        backbone: Backbone,
        latents: Tensor,
        cond: Conditioning,
        randomness: dict[str, Tensor],
        policy: nn.Module,
        reference: nn.Module | None,
        preference: Tensor | None = None,
        scores: Tensor | None = None,
        weight: Tensor | None = None,
        margin: Tensor | None = None,
        **inputs: Tensor,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Mean loss over the groups (each times its weight) and detached metrics.

        Args:
            latents: (B, K, C, h, w), best first.
            randomness: shared ``timesteps`` (B,) and ``noise`` (B, C, h, w) from :meth:`draw`.
            policy: the trained denoiser as the trainer runs it (possibly DDP-wrapped).
            reference: a frozen reference denoiser, or None for the LoRA-disabled base.
            preference: (B,) P(first item preferred), for soft-label losses on pairs.
            scores: (B, K) relevance of each item (ranked lists), higher is better.
            weight: (B,) each pair's weight (``data.weight_column``): the loss is the mean of weight x loss,
                as MADPO weights each pair's DPO loss.
            margin: (B,) each pair's target margin (``data.margin_column``), the margin option of the loss.
            inputs: (B,) per-pair inputs of the core loss (:attr:`~diffalign.losses.LossSpec.inputs`), such as
                SPPO's win-rates estimated by a self-play objective.
        """
        group = self.noise(backbone, latents, cond, randomness)
        policy_scores, ref = group_scores(backbone, group, policy=policy, reference=reference,
                                          need_reference=self.needs_reference)
        options = {**self.loss_options(policy_scores, ref), **self.scored_inputs(backbone, group), **inputs}
        if margin is not None:
            options["margin"] = margin
        per_group = self.per_group_loss(policy_scores, ref, preference=preference, scores=scores, options=options)
        if weight is not None:
            per_group = per_group * weight
        metrics = {"raw_model_loss": -policy_scores.detach().mean()}
        # the batch statistics the loss used, as TRL logs them: KTO's reference point kl, BCO's shift delta,
        # LCPO's label reliability
        metrics.update({name: torch.as_tensor(options[name], device=policy_scores.device)
                        for name in ("kl", "delta", "reliability") if name in options})
        if ref is not None:
            metrics.update(self.reward_metrics(policy_scores.detach(), ref, preference=preference, options=options))
            metrics["ref_loss"] = -ref.mean()
        return per_group.mean(), metrics

    def reward_metrics(self, policy: Tensor, reference: Tensor, *, preference: Tensor | None,
                       options: dict[str, Any]) -> dict[str, Tensor]:
        """Implicit-reward metrics of (B, K) scores: best against worst item (for pairs, TRL's DPO metrics).
        ``options`` are the core loss's options for this batch (:meth:`loss_options`)."""
        return losses.preference_metrics(policy[:, 0], policy[:, -1], reference[:, 0], reference[:, -1], beta=self.beta)
