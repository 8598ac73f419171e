"""Direct Group Preference Optimization (DGPO; Luo, Hu and Tang 2026, "Reinforcing Diffusion Models by Direct Group
Preference Optimization", ICLR 2026, arXiv 2510.08425): DPO between the better and the worse half of a group, on the
forward process, so rounds may be sampled with the deterministic sampler.

A round's samples get Flow-GRPO's group-relative advantages (:func:`diffalign.objectives.grpo.round_advantages`),
clipped to [-5, 5]. Within a group of K samples of one prompt, those with A > 0 form the positive group G+ and those
with A < 0 the negative group G-, and the policy maximises the likelihood of the group preference, a Bradley-Terry
model over advantage-weighted implicit rewards (the paper's group-level DPO objective):

    max log sigma(R(G+) - R(G-)),   R(G+) - R(G-) = -beta / K sum_i A_i (e_theta,i - e_ref,i),

where e_i = mean (f(x_t,i, t, c) - target_i)^2 is the denoising error of sample i noised afresh at one of the
sampler's noise levels, as in Diffusion-DPO. Its gradient is sigma(S) beta / K sum_i A_i grad e_theta,i with
S = beta / K sum_i A_i (e_theta,i - e_ref,i), so the authors train the equivalent loss (``compute_group_dgpo_loss_
allreduce`` in ``scripts/train_sd3_dgpo.py``; the constant beta / K goes into the learning rate)

    L = mean_i [ sg(sigma(S_g(i))) A_i e_theta,i ] + beta_KL mean ||f_theta - f_ref||^2:

a group the policy already orders well (S << 0) stops pulling, as a DPO pair does. The units of one batch are whole
groups, each group at one noise level and, by default, with one noise for all its samples (the authors'
``use_shared_noise``; they share one level across the whole batch), so the sum over a group compares like with like.
A PPO-style clip keeps each step near a trailing EMA of the policy (the "old" policy, decay min(0.3, 0.001 s) after
optimiser step s): where the ratio exp(e_old - e_theta) has left [1 - c, 1 + c] in the advantage's direction, the
sample's error enters without its gradient (their ``clip_dsm``). The reference is the base (adapters disabled, or the
frozen copy), optionally guided (their ``kl_cfg``), or the old policy itself (``reference: trailing``, their
``use_ema_ref``, from TDM-R1). After ``old_samples_after`` optimiser steps the rounds are sampled by the old policy
(their ``switch_ema_ref``). Defaults are the authors' README recipe ("rollout with CFG, training without"): beta 100,
KL 1e-3, clip 1e-3, the frozen reference unguided, shared noise, old-policy rollouts after 200 steps; rounds sampled
with the deterministic sampler (``objective.sample_eta=0``: their ``noise_level`` 0; they use DPM-Solver, diffalign
the ODE's Euler step or DDIM) and trained at the noisier steps (their ``trunc_steps``: set ``objective.t_range``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.objectives.forward_process import ForwardProcessObjective, squared_difference
from diffalign.objectives.grpo import AdvantageOptions

Tensor = torch.Tensor
OLD_DECAY_MAX = 0.3  # the authors' EMAModuleWrapper(decay=0.3), stepped with min(0.3, 0.001 * global_step)


def group_weights(advantage: Tensor, error: Tensor, reference_error: Tensor, group_size: int, beta: float) -> Tensor:
    """(B,) sigma(S_g) of each row's group, S_g = beta / K sum_{i in g} A_i (e_i - e_ref,i), for B rows that are
    consecutive groups of K (module docstring); without gradients."""
    with torch.no_grad():
        terms = (advantage * (error - reference_error)).view(-1, group_size).sum(dim=1) * beta / group_size
        return torch.sigmoid(terms).repeat_interleave(group_size)


def clipped_error(error: Tensor, old_error: Tensor, advantage: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """The errors with their gradient stopped where the ratio exp(e_old - e) has left [1 - clip, 1 + clip] in the
    advantage's direction (above for A > 0, below otherwise; the authors' ``clip_dsm``), and that mask."""
    ratio = torch.exp(old_error - error.detach())
    beyond = torch.where(advantage > 0, ratio > 1 + clip, ratio < 1 - clip)
    return torch.where(beyond, error.detach(), error), beyond


@dataclass
class DGPOOptions(AdvantageOptions):
    # weight of the KL to the base, the mean squared difference of the predictions (DGPO's train.beta)
    kl_coef: float = ranged(1e-3, "[0, inf)")
    # the DPO beta of the group preference: larger, a sharper sigmoid weighting of the groups (DGPO's beta_dpo)
    beta: float = ranged(100.0, "(0, inf)")
    # PPO-style clip of exp(e_old - e) around 1 against the trailing old policy; 0: no clip (DGPO's clip_range)
    ratio_clip: float = ranged(1e-3, "[0, 1)")
    # the reference of the group preference: the base model, or the trailing old policy (DGPO's use_ema_ref)
    reference: str = ranged("base", ("base", "trailing"))
    # classifier-free guidance of the base's prediction, as the reference and in the KL (DGPO's kl_cfg)
    reference_guidance_scale: float = ranged(1.0, "[1, inf)")
    # one noise for every sample of a group at training time (DGPO's use_shared_noise)
    group_noise: bool = True
    # optimiser steps after which the trailing old policy samples the rounds (DGPO's switch_ema_ref)
    old_samples_after: int = ranged(200, "[0, inf)")


class DGPO(ForwardProcessObjective):
    """Direct group preference optimisation; see the module docstring."""

    paper = "Luo et al. 2026, arXiv 2510.08425"

    loss_kinds = ("dgpo",)
    own_losses = ("dgpo",)
    shadow_weights = True
    whole_groups = True

    Options = DGPOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.options = o = self.options_of(config)
        self.sample_steps, self.eta = config.sample_steps, config.sample_eta
        self.uncond = backbone.empty_prompt() if o.reference_guidance_scale != 1.0 else None
        self.units_per_group = self.group_size  # build() sets the run's

    @classmethod
    def build(cls, config, model) -> "DGPO":
        objective = super().build(config, model)
        objective.units_per_group = cls.round_group_size(config)
        return objective

    # --- the trailing old policy: clip, optional reference, and later rollouts ----------------
    def trailing_schedule(self) -> tuple[float, int]:
        return OLD_DECAY_MAX, 1

    def sampling_denoiser(self) -> nn.Module | None:
        if self.trailing is not None and self.trailing.optimizer_steps > self.options.old_samples_after:
            return self.trailing.denoiser()
        return None

    # --- whole groups per batch --------------------------------------------------------------
    def choose_units(self, units: int, trained_steps: Tensor, n: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n // K random groups, all K samples of each, every sample of a group at the group's step."""
        k = self.units_per_group
        groups = torch.randint(0, units // k, (n // k,), generator=generator)
        steps = trained_steps[torch.randint(0, len(trained_steps), (n // k,), generator=generator)]
        return (groups[:, None] * k + torch.arange(k)).flatten(), steps.repeat_interleave(k)

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        if not self.options.group_noise:
            return super().draw(n, latent_shape, generator)
        k = self.units_per_group
        return {"noise": torch.randn((n // k, *latent_shape), generator=generator).repeat_interleave(k, dim=0)}

    # --- the loss ----------------------------------------------------------------------------
    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, advantage: Tensor,
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        noised = self.noised(backbone, latents, cond, randomness, policy)
        target = noised.rule.target(noised.x0, noised.steps, noised.noise)
        prediction = noised.predict(policy)
        error = (prediction - target).pow(2).flatten(1).mean(dim=1)
        advantage = advantage.to(error).clamp(-o.advantage_clip, o.advantage_clip)
        base = None
        if o.reference == "base" or o.kl_coef > 0:
            base = noised.reference_prediction(reference, o.reference_guidance_scale, self.uncond)
        old = None
        if o.reference == "trailing" or o.ratio_clip > 0:
            with torch.no_grad():
                old = noised.predict(self.trailing.denoiser())
        preferred = base if o.reference == "base" else old
        reference_error = (preferred - target).pow(2).flatten(1).mean(dim=1)
        weights = group_weights(advantage, error.detach(), reference_error, self.units_per_group, o.beta)
        metrics = {"group_weight": weights.mean(), "reference_gap": (error.detach() - reference_error).mean()}
        trained_error = error
        if o.ratio_clip > 0:
            old_error = (old - target).pow(2).flatten(1).mean(dim=1)
            trained_error, beyond = clipped_error(error, old_error, advantage, o.ratio_clip)
            metrics["clip_fraction"] = beyond.float().mean()
        policy_loss = (weights * advantage * trained_error).mean()
        metrics["policy_loss"] = policy_loss.detach()
        loss = policy_loss
        if o.kl_coef > 0:
            kl = squared_difference(prediction, base)
            loss = loss + o.kl_coef * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
