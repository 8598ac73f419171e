"""Image statistics that move when a run games its reward, measured on a batch of images in [0, 1].

Reward hacking shows in the images before it shows in a held-out reward: an OCR reward blanks the background to
black (UniRL #407: the dark-pixel share went from 0.45 to 0.93 without a KL), an aesthetic or PickScore reward
oversaturates, a reward with a blind spot in the frequency domain brings grid artefacts (flow_grpo #233), and a
collapsing policy draws one image for every seed (SRPO #22). Each statistic is one number per batch:

- ``dark_share`` / ``bright_share``: the share of pixels whose luma (ITU-R BT.601) is below 0.1 / above 0.9;
- ``saturation``: the mean HSV saturation, (max - min) / max over the channels;
- ``high_frequency``: the share of each image's spectral power (luma, mean removed) at spatial frequencies above a
  quarter of a cycle per pixel (half the Nyquist frequency), where grid and checkerboard artefacts put theirs;
- ``diversity``: the root mean square difference between two images of the same prompt (images resized to 64 x 64),
  averaged over every pair of a prompt's images and over prompts; 0 when every seed draws the same image.

:class:`diffalign.train.gold.DriftWatch` stops a run when one moves too far from the base's.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
STATISTICS = ("dark_share", "bright_share", "saturation", "high_frequency", "diversity")
DARK, BRIGHT = 0.1, 0.9
HIGH_FREQUENCY = 0.25  # cycles per pixel
DIVERSITY_SIDE = 64


def luma(images: Tensor) -> Tensor:
    """(N, H, W) luma of (N, 3, H, W) RGB images in [0, 1] (ITU-R BT.601 weights)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return torch.einsum("nchw,c->nhw", images, weights)


def high_frequency_share(images: Tensor) -> Tensor:
    """(N,) the share of each image's luma power (mean removed) above ``HIGH_FREQUENCY`` cycles per pixel."""
    y = luma(images.double())
    y = y - y.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(y).abs() ** 2
    fy, fx = torch.fft.fftfreq(y.shape[1], dtype=y.dtype), torch.fft.fftfreq(y.shape[2], dtype=y.dtype)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    total = power.sum(dim=(1, 2)).clamp(min=1e-12)
    return power[:, radius > HIGH_FREQUENCY].sum(dim=1) / total


def diversity(images: Tensor, prompts: Sequence[str]) -> float | None:
    """The mean RMS difference of two images of one prompt (module docstring); None when no prompt has two."""
    small = F.interpolate(images.float(), size=(DIVERSITY_SIDE, DIVERSITY_SIDE), mode="bilinear", antialias=True,
                          align_corners=False)
    per_prompt = []
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        pairs = [(small[a] - small[b]).pow(2).mean().sqrt() for a, b in combinations(rows, 2)]
        if pairs:
            per_prompt.append(torch.stack(pairs).mean())
    return float(torch.stack(per_prompt).mean()) if per_prompt else None


def image_statistics(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Every statistic of the module docstring for (N, 3, H, W) images in [0, 1] and their N prompts (diversity
    left out when no prompt has two images)."""
    images = images.float().clamp(0, 1)
    y = luma(images)
    top, bottom = images.amax(dim=1), images.amin(dim=1)
    stats = {"dark_share": float((y < DARK).float().mean()), "bright_share": float((y > BRIGHT).float().mean()),
             "saturation": float(torch.where(top > 0, (top - bottom) / top.clamp(min=1e-12), 0.0).mean()),
             "high_frequency": float(high_frequency_share(images).mean())}
    spread = diversity(images, prompts)
    if spread is not None:
        stats["diversity"] = spread
    return stats
