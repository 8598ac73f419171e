"""The toy video world: 9-frame 32x32 clips of one coloured shape moving across the frame.

A clip is a toy-world scene (:mod:`diffalign.toy.world`: a colour, a shape, a size) whose centre travels from a start
to an end point over :data:`FRAMES` frames, in one of four ways (:data:`MOTIONS`): at constant speed, speeding up,
with a shaky path, or stopping half way and going on. Captions name only the colour and the shape ("a red circle
moving"), so the path and its rhythm are free: that freedom is what the toy video preference
(:mod:`diffalign.toy.video_judge`) acts on, a person who likes smooth constant-speed motion. The shipped base model
(``assets/models/toy-video``, trained by ``python scripts/train_toy_video_base.py``) saw all four kinds equally often,
so its clips move every way; alignment trains on the image world's training pairs of colour and shape and is measured
on its held-out ones (:data:`diffalign.toy.world.HELDOUT`). Rendering depends only on the clip.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from diffalign.toy.world import COLOURS, SHAPES, SIZE, Scene, caption, render
from diffalign.toy.world import prompts as image_prompts

FRAMES = 9  # 4k + 1 for the toy video VAE's 2x in time: 5 latent frames
MOTIONS = ("steady", "speeding", "shaky", "stop_and_go")
RADIUS_RANGE = (5.0, 7.0)  # pixels: small enough to travel across the frame
TRAVEL_RANGE = (8.0, 14.0)  # pixels from the first frame's centre to the last's
SHAKE = 1.5  # pixels: the standard deviation of a shaky path's offsets from the straight one


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    radius: float
    path: tuple[tuple[float, float], ...]  # (cx, cy) of each frame
    motion: str

    @property
    def caption(self) -> str:
        return video_caption(self.colour, self.shape)

    def scenes(self) -> list[Scene]:
        return [Scene(self.colour, self.shape, self.radius, cx, cy) for cx, cy in self.path]


def video_caption(colour: str, shape: str) -> str:
    """``a red circle moving``: the image world's caption of the shape, moving."""
    return f"{caption(colour, shape)} moving"


def prompts(split: str = "all") -> list[str]:
    """Clip captions: ``train`` (alignment runs), ``heldout`` (evaluation) or ``all`` (the base's pre-training): the
    image world's split of colour and shape (:func:`diffalign.toy.world.prompts`), moving."""
    return [f"{text} moving" for text in image_prompts(split)]


def _progress(motion: str, frames: int) -> np.ndarray:
    """How far along its way the shape is at each frame, from 0 to 1: the motion's rhythm."""
    t = np.linspace(0.0, 1.0, frames)
    if motion in ("steady", "shaky"):
        return t
    if motion == "speeding":  # constant acceleration from rest
        return t**2
    if motion == "stop_and_go":  # twice the speed, a rest over the middle third of the frames
        third = frames // 3
        steps = np.r_[0.0, np.ones(frames - 1)]
        steps[third + 1:2 * third + 1] = 0.0
        return np.cumsum(steps) / steps.sum()
    raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")


def random_clip(rng: random.Random, colour: str | None = None, shape: str | None = None, motion: str | None = None,
                frames: int = FRAMES) -> Clip:
    """A clip with a uniform size, a uniform direction and travel, a start that keeps the whole path inside the
    frame, and a uniform kind of motion (unless given)."""
    radius = rng.uniform(*RADIUS_RANGE)
    travel = rng.uniform(*TRAVEL_RANGE)
    angle = rng.uniform(0.0, 2 * np.pi)
    dx, dy = travel * np.cos(angle), travel * np.sin(angle)
    lo, hi = radius + 1, SIZE - radius - 1  # a margin for the shake
    x0 = rng.uniform(max(lo, lo - dx), min(hi, hi - dx))
    y0 = rng.uniform(max(lo, lo - dy), min(hi, hi - dy))
    motion = motion or rng.choice(MOTIONS)
    along = _progress(motion, frames)
    xs, ys = x0 + dx * along, y0 + dy * along
    if motion == "shaky":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, SHAKE, size=(2, frames))
        xs, ys = np.clip(xs + noise[0], radius, SIZE - radius), np.clip(ys + noise[1], radius, SIZE - radius)
    return Clip(colour or rng.choice(list(COLOURS)), shape or rng.choice(SHAPES), radius,
                tuple((float(x), float(y)) for x, y in zip(xs, ys)), motion)


def render_clip(clip: Clip) -> np.ndarray:
    """The clip as RGB uint8 frames, shape (F, SIZE, SIZE, 3)."""
    return np.stack([render(scene) for scene in clip.scenes()])
