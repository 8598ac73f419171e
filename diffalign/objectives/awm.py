"""Advantage Weighted Matching (AWM; Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models", arXiv 2509.25050): policy gradient whose log-likelihood is the pretraining loss.

Flow-GRPO's likelihood is the density of one recorded sampler step; AWM's is the flow-matching (denoising) loss of
the clean sample, noised afresh, the quantity pretraining lowers. A round's samples get Flow-GRPO's group-relative
advantages (:func:`diffalign.objectives.grpo.round_advantages`), clipped to [-5, 5] and rescaled to [-1, 1]
(the authors' ``adv_clip_max`` 5 and ``advantage_max`` 1). Each clean sample x_0 is noised at one of the sampler's
noise levels t with fresh noise eps, x_t = a_t x_0 + b_t eps, and its log-likelihood proxy is

    l_theta = -w(t, e),   e = mean (f_theta(x_t, t, c) - target(x_0, eps, t))^2,

the target the backbone trains on (the velocity eps - x_0 on a flow model; epsilon, v or x_0 otherwise), and w the
authors' weighting (``compute_log_prob_awm`` in ``scripts/train_sd3_awm.py``): ``uniform`` w = e, ``t`` w = t e,
``t2`` w = t^2 e, ``ghuber`` w = t ((e + 1e-10)^p - 1e-10^p) / p (p = ``ghuber_power``, their recipes' 0.25,
which bounds the pull of samples the policy fits badly). The loss is the policy gradient surrogate

    L = -A exp(l_theta - sg(l_theta)) + beta ||f_theta - f_ref||^2 + beta_anchor ||f_theta - f_anchor||^2,

whose gradient is -A grad l_theta: good samples are fit harder, bad ones unlearned. This is the authors' clipped
surrogate (``loss_type="exp_first"``) as their recipes run it: on-policy (``off_policy=False``, the old
log-likelihood the current one detached), so the ratio is 1 and their ``clip_range`` 1 never binds. The KL terms are
their ``Uniform`` ones, the mean squared difference of the predictions: to the reference (the base, adapters
disabled or the frozen copy) and to an anchor, an EMA of the trained weights that starts as their copy and after
optimiser step s moves with decay min(``anchor_decay``, 0.001 s) (their ``kl_ema_decay_type="linear"``), so it
trails the policy by a few steps. Defaults follow the authors' SD3.5 OCR recipe (``config/dgx_awm.py``,
``ocr_sd3_no_cfg_1node``): KL 0.003, anchor weight 1 and decay 0.3, ghuber 0.25, no classifier-free guidance at
training or sampling (sample with ``objective.sample_guidance_scale=1``). Their recipes draw 6 noise levels per
sample, stratified over the first 90% of the sampler's steps; here each unit is one (sample, noise level) pair
drawn by the round driver from the steps ``objective.t_range`` keeps.
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
HUBER_FLOOR = 1e-10


def matching_log_likelihood(error: Tensor, noise_level: Tensor, weighting: str, power: float = 0.25) -> Tensor:
    """(B,) AWM's log-likelihood proxy -w(t, e) of (B,) mean squared matching errors e at noise levels t (module
    docstring; float64, as the authors compute it)."""
    error, t = error.double(), noise_level.to(error.device).double()
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -error * t
    if weighting == "t2":
        return -error * t ** 2
    if weighting == "ghuber":
        return -((error + HUBER_FLOOR) ** power - HUBER_FLOOR ** power) * t / power
    raise ValueError(f"unknown AWM weighting {weighting!r}: uniform, t, t2 or ghuber")


@dataclass
class AWMOptions(AdvantageOptions):
    # weight of the KL to the reference, the mean squared difference of the predictions (AWM's beta)
    kl_coef: float = ranged(0.003, "[0, inf)")
    # the clipped advantages are rescaled to [-advantage_max, advantage_max] (AWM's advantage_max)
    advantage_max: float = ranged(1.0, "(0, inf)")
    # how the matching error becomes the log-likelihood: uniform, t, t2 or ghuber (AWM's weighting)
    weighting: str = ranged("ghuber", ("uniform", "t", "t2", "ghuber"))
    # the power p of the ghuber weighting (AWM's ghuber_power)
    ghuber_power: float = ranged(0.25, "(0, 1]")
    # weight of the squared difference to the anchor, an EMA of the trained weights (AWM's ema_beta); 0: no anchor
    anchor_coef: float = ranged(1.0, "[0, inf)")
    # the anchor's largest decay, reached after anchor_decay / 0.001 optimiser steps (AWM's kl_ema_decay)
    anchor_decay: float = ranged(0.3, "[0, 1)")


class AWM(ForwardProcessObjective):
    """Advantage weighted matching; see the module docstring."""

    paper = "Xue et al. 2025, arXiv 2509.25050"

    loss_kinds = ("awm",)
    own_losses = ("awm",)
    shadow_weights = True

    Options = AWMOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        self.options = self.options_of(config)
        self.sample_steps, self.eta = config.sample_steps, config.sample_eta

    # --- the anchor: an EMA of the trained weights that the policy is kept near ------------
    def trailing_schedule(self) -> tuple[float, int] | None:
        return None if self.options.anchor_coef == 0 else (self.options.anchor_decay, 0)

    # --- the loss ----------------------------------------------------------------------------
    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, advantage: Tensor,
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        noised = self.noised(backbone, latents, cond, randomness, policy)
        prediction = noised.predict(policy)
        target = noised.rule.target(noised.x0, noised.steps, noised.noise)
        error = (prediction - target).pow(2).flatten(1).mean(dim=1)
        log_likelihood = matching_log_likelihood(error, noised.rule.noise_level(noised.steps), o.weighting,
                                                 o.ghuber_power)
        ratio = torch.exp(log_likelihood - log_likelihood.detach())
        scaled = advantage.to(ratio).clamp(-o.advantage_clip, o.advantage_clip) / o.advantage_clip * o.advantage_max
        policy_loss = -(scaled * ratio).mean().float()
        loss = policy_loss
        metrics = {"policy_loss": policy_loss.detach(), "matching_error": error.detach().mean(),
                   "log_likelihood": log_likelihood.detach().mean().float(),
                   "advantage_abs": scaled.abs().mean().float()}
        if o.kl_coef > 0:
            kl = noised.reference_squared_difference(prediction, reference)
            loss = loss + o.kl_coef * kl
            metrics["kl"] = kl.detach()
        if self.trailing is not None:
            with torch.no_grad():
                anchored = noised.predict(self.trailing.denoiser())
            anchor_kl = squared_difference(prediction, anchored)
            loss = loss + o.anchor_coef * anchor_kl
            metrics["anchor_kl"] = anchor_kl.detach()
        return loss, metrics
