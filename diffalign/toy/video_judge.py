"""What the toy video world's "human" sees in a clip: the asked shape moving, and how smoothly it moves.

Each frame is measured as the image world's judge measures an image (:func:`diffalign.toy.judge.measure`: the shape is
every pixel far from the background). A clip shows what was asked when every frame shows a shape, most frames show the
prompt's colour and shape, and the shape travels at least :data:`MIN_TRAVEL` pixels; the preference asks the same but
for the kind of shape (see :func:`clip_preference_score`). How smoothly it moves is the
roughness of its centroid's path: the mean length of the path's second differences, pixels per frame squared, 0 for
constant speed along a line, about 0.4 for a shape speeding up, 0.7 for one pausing, and about 2 to 9 for a shaky path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from diffalign.toy.judge import WRONG_CONTENT_PENALTY, Measurement, asked_content, measure

MIN_TRAVEL = 4.0  # pixels from the first frame's centroid to the last's for a shape that moves
ROUGHNESS_SCALE = 4.0  # pixels per frame squared that cost a clip 1 (a shaky path's); rougher costs no more


@dataclass(frozen=True)
class ClipMeasurement:
    frames: tuple[Measurement, ...]
    roughness: float | None  # mean |second difference| of the centroid path; None when a frame shows no shape
    travel: float  # pixels from the first frame's centroid to the last's (0 when a frame shows no shape)

    @property
    def content(self) -> tuple[str | None, str | None]:
        """The (colour, shape) most frames show."""
        return Counter((m.colour, m.shape) for m in self.frames).most_common(1)[0][0]

    @property
    def colour(self) -> str | None:
        """The colour most frames show."""
        return Counter(m.colour for m in self.frames).most_common(1)[0][0]

    @property
    def moves(self) -> bool:
        """Every frame shows a shape, and it travels :data:`MIN_TRAVEL` or more."""
        return self.roughness is not None and self.travel >= MIN_TRAVEL


def measure_clip(frames: np.ndarray) -> ClipMeasurement:
    """Measure one clip: RGB frames (F, H, W, 3), uint8 or float in [0, 255]."""
    measured = tuple(measure(frame) for frame in frames)
    if any(m.centre is None for m in measured):
        return ClipMeasurement(measured, None, 0.0)
    path = np.array([m.centre for m in measured])
    roughness = float(np.linalg.norm(np.diff(path, n=2, axis=0), axis=1).mean()) if len(path) > 2 else 0.0
    return ClipMeasurement(measured, roughness, float(np.linalg.norm(path[-1] - path[0])))


def clip_adheres(m: ClipMeasurement, prompt: str) -> float:
    """1.0 when the clip shows the prompt's colour and shape moving (every frame a shape, most the asked one, travel
    of :data:`MIN_TRAVEL` or more), else 0.0."""
    return float(m.moves and m.content == asked_content(prompt))


def moves_in_the_asked_colour(m: ClipMeasurement, prompt: str) -> bool:
    """Every frame shows a shape, most frames the prompt's colour, and it travels :data:`MIN_TRAVEL` or more."""
    return m.moves and m.colour == asked_content(prompt)[0]


def clip_preference_score(m: ClipMeasurement, prompt: str | None = None) -> float:
    """The toy video preference: minus the path's roughness over :data:`ROUGHNESS_SCALE` (capped at 1; 1 when a frame
    shows no shape), minus 1 more when a ``prompt`` is given and the clip does not show a shape of its colour moving.
    From 0 (a shape of the asked colour at constant speed along a line) down to -2.

    The kind of shape is left to the adherence judge (:func:`clip_adheres`): at 32 px, through the toy video VAE,
    the base's squares and triangles blur towards discs that the judge's bounding-box rule reads as circles, so a
    preference charging for the kind would mostly score those misreadings, not the motion it is about."""
    smoothness = -1.0 if m.roughness is None else -min(m.roughness / ROUGHNESS_SCALE, 1.0)
    if prompt is not None and not moves_in_the_asked_colour(m, prompt):
        smoothness -= WRONG_CONTENT_PENALTY
    return smoothness


def clips_to_arrays(clips: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Clips (N, 3, F, H, W) in [0, 1] (a tensor or an array) -> N arrays (F, H, W, 3) in [0, 255]."""
    if hasattr(clips, "detach"):
        clips = clips.detach().float().cpu().numpy()
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be (N, 3, F, H, W), not {tuple(clips.shape)}")
    return [np.clip(clip.transpose(1, 2, 3, 0) * 255.0, 0, 255) for clip in clips]


def video_preference_scores(clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The toy video preference of each clip (N, 3, F, H, W) in [0, 1] for its prompt, as an (N,) tensor."""
    return torch.tensor([clip_preference_score(measure_clip(c), p) for c, p in zip(clips_to_arrays(clips), prompts)])


def video_adherence(clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1 for each clip (N, 3, F, H, W) in [0, 1] that shows its prompt's shape moving, else 0, as an (N,) tensor."""
    return torch.tensor([clip_adheres(measure_clip(c), p) for c, p in zip(clips_to_arrays(clips), prompts)])
