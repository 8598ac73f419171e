"""SmPO-Diffusion (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion for
Aligning Diffusion Models with Varied Human Preferences", ICML 2025, arXiv 2506.02698).

Two changes to Diffusion-DPO:

1. Smoothed preferences. A hard 0/1 label says nothing of how much better the winner is. SmPO
   replaces it by a preference probability from reward-model scores
   (:func:`diffalign.data.smoothing.smoothed_preference`: per reward model the Bradley-Terry
   probability of the min-max normalised scores, averaged over models) and smooths the pair's
   densities as p(x^w)^p p(x^l)^(gamma - p) (Eq. 8). The DPO margin is then scaled by
   (2p - gamma) (Eq. 9; the ``smpo`` core loss), so near-ties barely move the model.
2. ReNoise inversion. Each image is scored at the x_t that the policy's ReNoise-refined DDIM
   inversion reaches (:mod:`diffalign.objectives.inverted`), a closer estimate of the image's
   own sampling trajectory than random noising.

Defaults follow the authors' code: a 10-point inversion grid (they use 5 for SD1.5), one
ReNoise refinement whose estimate is averaged with the plain DDIM one, no stochastic term, and
gamma = 1. Their loss is ``-log sigma(-0.5 * beta * 10 * (2p - 1) * (model_diff - ref_diff))``
with beta 5000, i.e. ``smpo`` here with beta = 25000. As for InPO, our walk lands exactly on t.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.config import ranged
from diffalign.objectives.inverted import InversionOptions, InvertedDiffusionDPO


@dataclass
class SmPOOptions(InversionOptions):
    # ReNoise refinements per inversion move (SmPO inverts with ReNoise)
    renoise_iterations: int = ranged(1, "[0, inf)")


class SmPO(InvertedDiffusionDPO):
    """Soft-label Diffusion-DPO at ReNoise-inverted latents; see the module docstring."""

    paper = "Lu et al. 2025, arXiv 2506.02698"

    loss_kinds = ("soft-label",)
    Options = SmPOOptions
    renoise_average_from = 0
