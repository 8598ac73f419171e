"""Left-right flips of the training images, each decided by (seed, position in the run, item).

The Diffusion-DPO authors' ``train.py`` flips every image with probability 1/2 on its own
(torchvision's ``RandomHorizontalFlip`` in its transforms, on unless ``--no_hflip``); diffusers'
DPO examples flip a pair's two images together. Here each image draws its own flip, as the
authors do, from a generator of (seed, position) kept apart from the one of the example's timestep
and noise, so a resumed run and N processes read what one uninterrupted run reads.

A flipped image is another image to the latent cache: its id gets a suffix, so its latents are
encoded from the flipped pixels (a VAE is not mirror-symmetric) and cached beside the others.
"""

from __future__ import annotations

import dataclasses

import torch

from diffalign.data.order import example_generator
from diffalign.data.pairs import GroupExample

FLIPPED = ":flipped"  # suffix of a flipped image's cache id


class RandomFlip:
    """``flip(position, example)``: the example with each image flipped left-right or not."""

    _TAG = 104729  # keeps these draws apart from the examples' timestep, noise and class generators

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def flags(self, position: int, items: int) -> list[bool]:
        """Which of the ``items`` images of the example at ``position`` are flipped (each with probability 1/2)."""
        return (torch.rand(items, generator=example_generator(self.seed, self._TAG, position)) < 0.5).tolist()

    def __call__(self, position: int, example: GroupExample) -> GroupExample:
        flags = self.flags(position, len(example.image_ids))
        ids = tuple(image_id + FLIPPED if flip else image_id for image_id, flip in zip(example.image_ids, flags))
        pixels = example.pixels  # (K, 3, R, R), or None for an example read without decoding
        if pixels is not None:
            pixels = torch.stack([image.flip(-1) if flip else image for image, flip in zip(pixels, flags)])
        return dataclasses.replace(example, pixels=pixels, image_ids=ids)
