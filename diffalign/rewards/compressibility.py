"""DDPO's JPEG rewards (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning",
arXiv 2305.13301, Sec. 6.1): an image's size as a JPEG at quality 95, in kilobytes, negated for
compressibility (fewer details, flatter colours) and as is for incompressibility. No weights, so they
score any prompt; DDPO and Flow-GRPO (its ``jpeg_compressibility`` reward) use them as reward tasks.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch

from diffalign.diffusion.sampling import to_pil

JPEG_QUALITY = 95


def jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    """(N,) the size of each image in [0, 1] (N, 3, H, W), 8-bit, as a JPEG at quality 95, in kB (1000 bytes)."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


class JpegCompressibility:
    """Minus the JPEG size in kB: higher for images that compress well."""

    name = "jpeg_compressibility"
    description = ("DDPO's compressibility task: minus the image's size as a JPEG at quality 95, in kilobytes; "
                   "higher is better (flatter, less detailed images).")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_kilobytes(images)


class JpegIncompressibility:
    """The JPEG size in kB: higher for detailed images."""

    name = "jpeg_incompressibility"
    description = ("DDPO's incompressibility task: the image's size as a JPEG at quality 95, in kilobytes; higher "
                   "is better (more detailed images).")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_kilobytes(images)
