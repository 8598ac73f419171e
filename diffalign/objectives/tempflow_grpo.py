"""TempFlow-GRPO (He et al. 2025, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models", arXiv 2508.04324):
Flow-GRPO with the noise of each trajectory concentrated at one branching step, and each step's surrogate weighted by
how much noise that step draws.

Why: a Flow-GRPO trajectory draws noise at every step and is scored once at the end, so each step's unit is credited
with the whole trajectory's reward, most of which the other steps' noise decided. TempFlow-GRPO samples the
deterministic sampler (the ODE) everywhere but at one step j: from a shared starting noise ("seed group") the ODE
reaches x_j, C children each draw the step's noise there (the flow SDE of Flow-GRPO), and each child is finished by the
ODE. The children's rewards then differ only through the noise of step j, so their group-relative advantage is that
step's own process reward. Early steps, whose noise decides the layout, draw more noise than late ones, and the
surrogate of a step is weighted by it:

    L_j = w_j max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),        w_j = 2.25 sigma_j sqrt(dt_j),

sigma_j sqrt(dt_j) the standard deviation of the step's Gaussian (the authors' "noise-aware weighting"), plus
Flow-GRPO's KL to the reference, advantages normalised within each prompt's group at that step (the standard
deviation of the group's, the authors' ``global_std=False``).

Read from the authors' code (Shredded-Pork/TempFlow-GRPO): ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_perstep.py``
(the ODE path, and at each step 6 SDE children finished by the ODE, one image each), ``sd3_sde_with_logprob_perstep.py``
(``sde_step_with_logprob``: the returned ``std_dev_t * sqrt(-dt)``, "the original paper's case"), ``scripts/train_sd3_pr.py``
(the loss ``-2.25 * std_dev_t * advantages * ratio`` and its clipped twin; per-prompt advantages over the children of
each branching step; the KL loss) and ``config/dgx.py`` (``*_pr``: 4 starting noises a prompt, 6 children each, groups
of 24, 10 steps, KL weight 0.004 (0.001 for PickScore), ``global_std=False``).

How it runs here, on the one round driver: a round branches every group at the same step j, in turn over the steps
the run trains (all but the last, which the authors never branch at; within ``objective.t_range``), one step a round
(:meth:`stochastic_steps`), where the authors branch at every step of every round. Each of a group's
``online.group_size`` samples is sampled whole, its ODE steps before j recomputed rather than shared with its
siblings (the same latents: the steps are deterministic from the same starting noise), ``options.parents`` starting
noises a group, each shared by ``group_size / parents`` children (:meth:`starting_noises`). The estimator of each
unit (its advantage, ratio, weight and KL) is the authors'. On an epsilon model (the toy, SD1.5, SDXL) the branching
step is DDIM with eta and the weight the std of that Gaussian step, an extension of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import ObjectiveConfig, ranged
from diffalign.diffusion import Backbone
from diffalign.errors import UserError
from diffalign.objectives.grpo import FlowGRPO, GRPOOptions

Tensor = torch.Tensor


@dataclass
class TempFlowGRPOOptions(GRPOOptions):
    # the starting noises ("seeds") of a group, each followed by the ODE to the branching step, where
    # online.group_size / parents children draw its noise (the authors: 4 seeds of 6 children, groups of 24)
    parents: int = ranged(4, "[1, inf)")
    # a step's surrogate is weighted by weight_scale x the std of its Gaussian step (the authors' 2.25)
    weight_scale: float = ranged(2.25, "(0, inf)")
    # weight of the KL to the reference (the authors' beta for GenEval, OCR and FLUX; 0.001 for PickScore)
    kl_coef: float = ranged(0.004, "[0, inf)")
    # advantages over the std of each prompt's group at its branching step (the authors' global_std=False)
    advantage_std: str = ranged("group", ("global", "group"))


class TempFlowGRPO(FlowGRPO):
    """Flow-GRPO on branched rounds with the noise-aware step weight; see the module docstring. Trains on
    :class:`FlowGRPO`'s units, each at its round's branching step."""

    paper = "He et al. 2025, arXiv 2508.04324"
    own_losses = ("ppo_clip",)
    group_size = 24
    shared_noise = False

    Options = TempFlowGRPOOptions

    def __init__(self, config: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        options = self.options_of(config)
        self.parents, self.weight_scale = options.parents, options.weight_scale

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        parents, group = cls.options_of(config.objective).parents, cls.round_group_size(config)
        if group % parents:
            raise UserError(f"tempflow_grpo branches each of objective.options.parents={parents} starting noises into "
                            f"the same number of children: online.group_size={group} must be a multiple of it")
        if config.online.sde_window:
            raise UserError("tempflow_grpo chooses the one step of each round that draws noise (its branching "
                            "step): remove online.sde_window")
        if config.online.shared_noise:
            raise UserError("tempflow_grpo shares each starting noise among its children "
                            "(objective.options.parents): remove online.shared_noise")

    def starting_noises(self, group_size: int) -> int:
        """``parents`` starting noises a group, each followed by ``group_size / parents`` children."""
        return self.parents

    def stochastic_steps(self, r: int, candidates: Tensor, steps: int) -> Tensor:
        """Round r draws noise at one step: the (r mod n)-th of the n steps the run may train, the last sampler step
        left out as the authors leave it (a branch there has no ODE step after it)."""
        branchable = candidates[candidates < steps - 1] if bool((candidates < steps - 1).any()) else candidates
        window = torch.zeros(steps, dtype=torch.bool)
        window[int(branchable[r % len(branchable)])] = True
        return window

    def log_ratio(self, log_prob: Tensor, old_log_prob: Tensor, **step: Any) -> tuple[Tensor, Tensor]:
        """Flow-GRPO's log-ratio, each unit weighted by ``weight_scale`` x its step's standard deviation."""
        return log_prob - old_log_prob, self.weight_scale * step["std"].flatten().to(log_prob)
