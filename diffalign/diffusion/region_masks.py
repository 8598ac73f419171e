"""SparsePO's masks for a diffusion model: a weight per latent location, read from the reference's prediction.

SparsePO (Christopoulou et al. 2024, arXiv 2410.05102) weighs each token of a completion by a mask a small model
reads from the frozen reference. A latent image has locations where a text has tokens: the denoising score splits
over them (:func:`diffalign.diffusion.location_scores`), and a mask per location lets the preference rest on the
regions that decide it. This mask model is diffalign's counterpart of the authors' ``simple_all`` model for latents
(not from a paper): at each location it reads the noised latent and the reference's prediction there (2C numbers)
through a 1x1 convolution of ``width`` channels and a ReLU, then a bias-free 1x1 convolution to one channel and a
ReLU, so masks are non-negative. As for the token masks, the first layer starts normal (std 0.02, zero bias) and
the second at 1/width, so every location starts with a small mask that can grow.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class RegionMaskModel(nn.Module):
    """(N, h, w) masks from the noised latents and the reference's predictions, each (N, C, h, w)."""

    def __init__(self, channels: int, width: int = 32, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.read = nn.Conv2d(2 * channels, width, kernel_size=1)
        self.mix = nn.Conv2d(width, 1, kernel_size=1, bias=False)
        nn.init.normal_(self.read.weight, std=init_std)
        nn.init.zeros_(self.read.bias)
        nn.init.constant_(self.mix.weight, 1.0 / width)

    def forward(self, noisy: Tensor, prediction: Tensor) -> Tensor:
        features = torch.cat([noisy, prediction], dim=1).to(self.read.weight.dtype)
        return torch.relu(self.mix(torch.relu(self.read(features)))).squeeze(1)
