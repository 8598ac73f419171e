"""DDIM-InPO (Lu et al. 2025, "InPO: Inversion Preference Optimization with Reparametrized DDIM
for Efficient Diffusion Model Alignment", arXiv 2503.18454), through any pairwise core loss.

InPO treats the diffusion model as a one-step generator reparametrised by DDIM: the latent the
model itself maps to x_0 is found by DDIM inversion, and the implicit reward is assigned there
(:mod:`diffalign.objectives.inverted` has the equations). Latents strongly tied to the
preference are the ones the inversion lands on, so training concentrates there.

Defaults follow the authors' code: a 10-point inversion grid, stochastic inversion with
eta = 0.1, the policy (without gradients) doing the inversion, and beta 5000 in their
Diffusion-DPO convention, which is 2500 in ours (the factor 1/2 folded in). One difference:
their walk stops at the last grid point below t, ours makes one more DDIM move to land on t,
so x_t and the implied noise belong to the same timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.config import ranged
from diffalign.objectives.inverted import InversionOptions, InvertedDiffusionDPO


@dataclass
class InPOOptions(InversionOptions):
    # the inversion's stochastic term eta (InPO's DDIM inversion with eta 0.1)
    inversion_eta: float = ranged(0.1, "[0, 1]")


class InPO(InvertedDiffusionDPO):
    """Diffusion-DPO at DDIM-inverted latents; see the module docstring."""

    paper = "Lu et al. 2025, arXiv 2503.18454"

    Options = InPOOptions
