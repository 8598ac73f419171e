"""What the toy world's "human" sees in an image: the shape's size, centring, colour and kind.

Measurements work on any RGB image (rendered or generated): the shape is every pixel far from
the background colour. From them come the toy preference (larger, more centred shapes win) and
the prompt-adherence judge (the asked colour and shape are what is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from diffalign.toy.world import BACKGROUND, COLOURS, SIZE, parse_caption

FOREGROUND_DISTANCE = 80.0  # RGB distance from the background that counts as shape
EDGE_DISTANCE = 20.0  # RGB distance from the background below which a pixel is background in the sub-pixel centre
_PALETTE = np.array(list(COLOURS.values()), float)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Measurement:
    area: float  # shape pixels / all pixels
    offset: float  # distance of the shape's centroid from the image centre, in half-widths
    colour: str | None  # nearest palette colour of the shape's mean colour
    shape: str | None  # circle, square or triangle, from how much of its bounding box it fills
    centre: tuple[float, float] | None = None  # (x, y) of the shape's sub-pixel centroid (see measure); None: no shape


def measure(image: np.ndarray) -> Measurement:
    """Measure one RGB image, uint8 or float in [0, 255], shape (H, W, 3). The centre weighs each pixel by how much
    of it the shape covers (its distance from the background over the shape colour's, clipped to [0, 1]; pixels
    closer to the background than :data:`EDGE_DISTANCE` weigh 0), so it moves smoothly with the shape."""
    image = np.asarray(image, float)
    distance = np.linalg.norm(image - np.array(BACKGROUND, float), axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    h, w = mask.shape
    if mask.sum() < 3:
        return Measurement(0.0, 1.0, None, None)
    ys, xs = np.nonzero(mask)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = float(np.linalg.norm(np.array([ys.mean(), xs.mean()]) - centre) / (min(h, w) / 2))
    mean_colour = image[mask].mean(axis=0)
    colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - mean_colour, axis=1)))]
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    cover = np.where(distance > EDGE_DISTANCE, np.clip(distance / np.linalg.norm(mean_colour - BACKGROUND), 0, 1), 0.0)
    rows, columns = np.indices(cover.shape)
    centre_xy = (float((cover * columns).sum() / cover.sum()), float((cover * rows).sum() / cover.sum()))
    return Measurement(float(mask.mean()), offset, colour, shape, centre_xy)


WRONG_CONTENT_PENALTY = 1.0


def preference_score(m: Measurement, prompt: str | None = None) -> float:
    """The toy preference: shape side length (as a fraction of the image) minus centroid offset,
    minus 1 when a ``prompt`` is given and the image does not show its colour and shape.

    The first two terms are in [0, 1]; a large centred shape scores near 0.7, a small corner one
    near -0.5. Like a person (or PickScore, HPS, ImageReward, which score text-image agreement as
    well as appeal), the toy human ranks a picture of the wrong thing below any right one.
    """
    score = float(np.sqrt(m.area) - m.offset)
    if prompt is not None and not adheres(m, prompt):
        score -= WRONG_CONTENT_PENALTY
    return score


def asked_content(prompt: str) -> tuple[str, str]:
    """The (colour, shape) a toy prompt asks for; a ValueError for a prompt that names neither."""
    asked = parse_caption(prompt)
    if asked is None:
        raise ValueError(f"{prompt!r} is not a toy-world prompt (it must name a colour and a shape)")
    return asked


def adheres(m: Measurement, prompt: str) -> float:
    """1.0 when the image shows the prompt's colour and shape, else 0.0."""
    return float((m.colour, m.shape) == asked_content(prompt))


def images_to_arrays(images) -> list[np.ndarray]:
    """Accept PIL images, uint8 arrays, or a float tensor/array (N, 3, H, W) in [0, 1]."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
        return [np.clip(im.transpose(1, 2, 0) * 255.0, 0, 255) for im in images]
    return [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]


assert SIZE == 32  # the thresholds above were set for 32x32 images


def preference_scores(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The toy preference of each image (N, 3, H, W) in [0, 1] for its prompt, as an (N,) tensor."""
    import torch

    return torch.tensor([preference_score(measure(im), p) for im, p in zip(images_to_arrays(images), prompts)])


SOFT_EDGE = 8.0  # RGB distance over which a pixel goes from background to shape in the soft measurement
SOFT_COLOUR_TEMPERATURE = 20.0  # RGB distance scale of the soft nearest-palette-colour choice


def soft_preference_scores(images: "torch.Tensor", prompts: Sequence[str]) -> "torch.Tensor":
    """A differentiable stand-in for the toy preference, for methods that follow a reward's gradient (DRaFT,
    AlignProp, ReFL): (N,) scores of (N, 3, H, W) images in [0, 1], with gradients.

    The hard measurement's thresholds become sigmoids and argmins softmaxes: a pixel is shape with weight
    sigmoid((d - 80) / 8), d its RGB distance from the background; the area, the centroid's offset and the shape's
    mean colour are those weights' means; and the penalty for the wrong content is 1 minus the softmax probability
    (over the palette, at distance scale 20) that the mean colour is the asked one. The kind of shape, which the hard
    judge reads from the shape's bounding box, is not scored (a bounding box has no useful gradient), so it ranks
    images as the toy preference does except where only the shape is wrong."""
    import torch

    pixels = images.float() * 255.0
    background = torch.tensor(BACKGROUND, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    weight = torch.sigmoid(((pixels - background).pow(2).sum(dim=1).add(1e-6).sqrt() - FOREGROUND_DISTANCE)
                           / SOFT_EDGE)  # (N, H, W)
    n, h, w = weight.shape
    mass = weight.flatten(1).sum(dim=1).clamp(min=1e-6)
    ys = torch.arange(h, dtype=pixels.dtype, device=pixels.device).view(1, h, 1)
    xs = torch.arange(w, dtype=pixels.dtype, device=pixels.device).view(1, 1, w)
    centroid = torch.stack([(weight * ys).flatten(1).sum(1), (weight * xs).flatten(1).sum(1)], dim=1) / mass[:, None]
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=pixels.dtype, device=pixels.device)
    offset = (centroid - centre).pow(2).sum(dim=1).add(1e-6).sqrt() / (min(h, w) / 2)
    area = weight.flatten(1).mean(dim=1)
    colour = (pixels * weight[:, None]).flatten(2).sum(dim=2) / mass[:, None]  # (N, 3)
    palette = torch.tensor(_PALETTE, dtype=pixels.dtype, device=pixels.device)
    chance = torch.softmax(-(colour[:, None] - palette[None]).pow(2).sum(dim=2).sqrt() / SOFT_COLOUR_TEMPERATURE, dim=1)
    asked = [_NAMES.index(asked_content(prompt)[0]) for prompt in prompts]
    right_colour = chance[torch.arange(n, device=pixels.device), torch.tensor(asked, device=pixels.device)]
    return area.add(1e-6).sqrt() - offset - WRONG_CONTENT_PENALTY * (1 - right_colour)
