"""GRPO-Guard (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319): Flow-GRPO with its importance ratio normalised and its steps' gradients balanced.

Why: on the flow SDE the sampled next latent is x' = mu_old + s z (s the step's standard deviation, z ~ N(0, I)), so
Flow-GRPO's log-ratio of the policy's step density to the sampler's is, element mean,

    log rho = mean(z d) / s - mean(d^2) / (2 s^2),        d = mu_theta - mu_old.

The second term is never positive: the ratios sit below 1 on average, more so at the steps with a small s, and
PPO's clip at 1 + eps stops few of the positive-advantage updates it exists to stop (the paper's "left-shifted"
ratio distribution, and the over-optimisation that follows). GRPO-Guard (RatioNorm) adds the bias back and scales
the log-ratio by s,

    log rho_guard = (log rho + mean(d^2) / (2 s^2)) s = mean(z d),

a ratio centred on 1 whose spread no longer grows as s shrinks, and divides each step's clipped surrogate by |dt|
(the step's change of noise level), since d, and so the gradient, is proportional to dt: every step then pulls with
a like weight. The loss is otherwise Flow-GRPO's (:mod:`diffalign.objectives.grpo`: advantages, their clip, the KL).

The authors have not released their code (hxm2023/GRPO-Guard on GitHub is an unrelated project); read from
verl-omni's ``GRPOGuardLoss`` (verl_omni/trainer/diffusion/diffusion_algos.py: ratio
exp((log_prob - old_log_prob + mse / (2 scale^2)) scale), scale = sqrt(-dt) std_dev_t, loss / sqrt(-dt)^2) and
Flow-Factory's ``GRPOGuardTrainer`` (src/flow_factory/trainers/grpo.py: the same ratio, without the 1 / |dt|
weight). The ratio is computed here in its closed form mean(z d), z = (x' - mu_old) / s, which equals theirs on the
flow SDE (the tests check it against their expression) and keeps its meaning under ``objective.sampler=cps``, whose
log-probabilities drop the Gaussian's scale. The sampler's mean mu_old is recorded with each round
(``keeps_step_means``), as both do. Because the normalised log-ratio is s times smaller, the clip range is too:
2e-6, verl-omni's recipe (``clip_ratio=2e-6``). The paper and both implementations train flow models; on a DDPM-
family model (SD1.5, SDXL, the toy) the DDIM step with eta is the Gaussian step, the ratio is the same closed form,
and dt is the drop of the flow-equivalent noise level b / (a + b) of x = a x_0 + b eps
(:meth:`~diffalign.diffusion.logprob.StepRule.level_drop`), an extension of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone
from diffalign.diffusion.logprob import StepRule
from diffalign.errors import UserError
from diffalign.objectives.grpo import AdvantageOptions, FlowGRPO

Tensor = torch.Tensor


@dataclass
class GRPOGuardOptions(AdvantageOptions):
    # the normalised ratio is clipped to [1 - ratio_clip, 1 + ratio_clip] (verl-omni's GRPO-Guard clip_ratio)
    ratio_clip: float = ranged(2e-6, "(0, 1)")
    # each step's surrogate divided by |dt| (verl-omni, the paper's gradient reweighting), or not (Flow-Factory)
    step_weight: str = ranged("inverse_dt", ("inverse_dt", "none"))


class GRPOGuard(FlowGRPO):
    """Flow-GRPO with RatioNorm and the 1 / |dt| step weight; see the module docstring. Trains on the units of
    :class:`FlowGRPO`, with ``old_means`` (B, T, C, h, w), the sampler's step means, among the targets."""

    paper = "Wang et al. 2025, arXiv 2510.22319"
    own_losses = ("ppo_clip",)
    keeps_step_means = True

    Options = GRPOGuardOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.step_weight = self.options_of(config).step_weight

    def training_units(self, round_) -> dict[str, Any]:
        """:class:`FlowGRPO`'s units and the round's recorded step means."""
        if round_.means is None:
            raise UserError("this round was sampled without its step means (a round sampled by another objective, "
                            "before a resume?): grpo_guard needs them; start the run again with a new output_dir")
        units = super().training_units(round_)
        units["targets"]["old_means"] = round_.means.flatten(0, 1)
        return units

    def log_ratio(self, log_prob: Tensor, old_log_prob: Tensor, *, backbone: Backbone, mean: Tensor, std: Tensor,
                  sample: Tensor, rows: Tensor, step: Tensor, old_means: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
        """(B,) mean(z d), z the step's noise as the sampler drew it, d the policy's mean minus the sampler's; and
        (B,) each unit's weight, 1 / |dt| of its step (or 1)."""
        old_mean = old_means[rows, step].to(mean)
        noise = (sample.float() - old_mean) / std
        log_ratio = (noise * (mean - old_mean)).flatten(1).mean(dim=1)
        if self.step_weight == "none":
            return log_ratio, torch.ones_like(log_ratio)
        rule = StepRule(backbone, old_means.shape[1], self.eta, tuple(old_means.shape[2:]), sampler=self.sampler)
        drop = torch.tensor([rule.level_drop(k) for k in step.tolist()], device=log_ratio.device)
        return log_ratio, 1.0 / drop
