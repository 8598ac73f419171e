"""The gradient-direction check the forward-process methods (DiffusionNFT, AWM, DGPO) share: two clean samples of one
prompt, one with a positive advantage and one with a negative, and one plain SGD step on the method's loss; the
better sample's denoising error must fall and the worse one's rise."""

from __future__ import annotations

import torch

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.paths import TOY_BASE


def errors_around_one_step(make_objective, *, advantage: float, lr: float, step: int = 5, seed: int = 5,
                           shared_noise: bool = False, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(before, after): the two samples' denoising errors at sampler ``step`` of 10 on the toy model, before and
    after one SGD step of size ``lr`` on the loss of ``make_objective(backbone)`` with advantages (+a, -a).
    ``reference`` passes a frozen copy of the base (for methods that compare with it in their loss)."""
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = make_objective(backbone)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(1 if shared_noise else 2, 4, 16, 16, generator=g).expand(2, -1, -1, -1)
    randomness = {"step": torch.tensor([step, step]), "noise": noise}
    cond = backbone.encode_prompts(["a red circle", "a red circle"])

    def errors() -> torch.Tensor:
        with torch.no_grad():
            noised = objective.noised(backbone, x0[:, None], cond, randomness, backbone.denoiser)
            target = noised.rule.target(noised.x0, noised.steps, noised.noise)
            return (noised.predict(backbone.denoiser) - target).pow(2).flatten(1).mean(dim=1)

    before = errors()
    frozen = load_pipeline(TOY_BASE).unet if reference else None
    loss, _ = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, frozen,
                        advantage=torch.tensor([advantage, -advantage]))
    loss.backward()
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return before, errors()
