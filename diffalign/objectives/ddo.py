"""DDO (Zheng et al. 2025, "Direct Discriminative Optimization: Your Likelihood-Based Visual
Generative Model is Secretly a GAN Discriminator", arXiv 2503.01103): GAN-style fine-tuning with
the model's own likelihood ratio as the discriminator.

With r(x) = log p_theta(x) - log p_ref(x), the discriminator is sigma(beta r(x)), and the loss
over real data and samples of the reference is

    L = -E_data log sigma(beta r(x)) - alpha E_{x ~ p_ref} log(1 - sigma(beta r(x)))

(the core ``ddo`` loss). For a diffusion model r is the difference of ELBOs, estimated like
Diffusion-DPO's implicit reward: r(x) ~ s_theta(x) - s_ref(x) with s = -w(t) ||target -
prediction||^2 at one t and noise (:mod:`diffalign.diffusion.likelihood`). Here each real image
is paired with one sample of the reference drawn *for the same caption*, and both are noised at
the same t and noise, which lowers the variance of the estimate; the two terms of the loss stay
separate.

Self-play on the round driver (:mod:`diffalign.train.online`): round r pairs the next
``online.groups_per_round`` real images of the run's order with one sample each of the round's reference
for the same caption, drawn at the round's start with the stochastic sampler of
:mod:`diffalign.diffusion.logprob` (``objective.sample_steps``, ``sample_eta``; ``sample_guidance_scale`` 1
samples p_ref itself, as the paper's guidance-free setting). The reference is the policy as it was at the
start of the round (:mod:`diffalign.objectives.round_reference`, as the self-play loops' pi_t), moved to the
policy every ``online.steps_per_round`` optimiser steps. Rounds are written to disk and the reference is saved
in every checkpoint, so resume is exact.

beta and alpha from the paper: its diffusion grid is alpha in [0.5, 6] and beta in [0.01, 0.1] (ablations
at beta 0.05, alpha 4), for r = log p_theta(x) - log p_ref(x) in nats, estimated as a difference of
denoising errors summed over the D elements of x (EDM's loss). The score here is a per-element mean, so
the same discriminator takes beta_here = D * beta_paper, the per-noise-level weight taken as 1 (as
Diffusion-DPO's beta absorbs it): the toy's 4x16x16 latents give 0.05 * 1024 = 51, SDXL's 4x128x128 at
1024 px 0.05 * 65536 = 3277. alpha carries over unchanged; the recipes use the ablation's 4.
"""

from __future__ import annotations

from diffalign.objectives.self_play import SelfPlayObjective


class DDO(SelfPlayObjective):
    """Real images against the round's reference samples; see the module docstring.

    Called with ``latents`` (B, 2, C, h, w): each real image, then the reference's sample for its caption.
    """

    paper = "Zheng et al. 2025, arXiv 2503.01103"

    group_size = 1  # one sample of the reference per real image
    group_size_fixed = True
    real_data = True
    scored = False  # the real image is the positive, the sample the negative: no reward, no label
