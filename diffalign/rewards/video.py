"""Rewards on videos: any image reward over a clip's frames, and the temporal consistency of a clip.

A video model's samples are clips, float (N, 3, F, H, W) in [0, 1]. An image reward (PickScore, HPS, OCR, ...) scores
each frame against the clip's prompt and the clip gets the frames' mean, or their minimum (``frames=min`` in the
reward's spec, e.g. ``pickscore:/models/PickScore_v1:frames=min``): the mean rewards a clip that is good on average,
the minimum one with no bad frame, as the video RL papers score frames (DanceGRPO scores HPS on sampled frames).
``temporal_consistency`` scores how alike neighbouring frames look to CLIP: a smooth clip scores near 1, a flickering
one lower (the feature-similarity consistency that VBench's subject- and background-consistency dimensions measure
with DINO and CLIP features).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import ClipImageTower

Tensor = torch.Tensor

FRAME_REDUCTIONS = ("mean", "min")


def frames_reduction(value: str) -> str:
    """The ``frames=`` option of an image reward's spec, checked."""
    if value not in FRAME_REDUCTIONS:
        raise UserError(f"frames={value!r}: an image reward scores a clip by the {' or the '.join(FRAME_REDUCTIONS)} "
                        "of its frames' scores")
    return value


def score_media(model, images: Tensor, prompts: Sequence[str], with_gradient: bool = False) -> Tensor:
    """(N,) scores of images (N, 3, H, W) or clips (N, 3, F, H, W) in [0, 1] against their prompts: an image reward
    scores a clip frame by frame and reduces by its ``frames_reduce`` (mean unless its spec said ``frames=min``); a
    reward that ``reads_clips`` gets the clips whole. ``with_gradient``: through the model's
    ``score_with_gradient`` (the reward-gradient methods), so the scores stay differentiable in the pixels."""
    score = model.score_with_gradient if with_gradient else model
    if images.dim() == 4 or getattr(model, "reads_clips", False):
        return score(images, prompts)
    n, channels, f = images.shape[:3]
    frames = images.transpose(1, 2).reshape(n * f, channels, *images.shape[3:])
    scores = score(frames, [prompt for prompt in prompts for _ in range(f)]).float().view(n, f)
    return scores.min(dim=1).values if getattr(model, "frames_reduce", "mean") == "min" else scores.mean(dim=1)


class TemporalConsistency(ClipImageTower):
    """The mean cosine of CLIP's image embeddings of each pair of neighbouring frames of a clip, in [-1, 1] (about 0.9
    and above for a steady clip); the prompt is not read. A transformers CLIPModel folder with its processor (the
    folder of openai/clip-vit-large-patch14, say); only its vision tower runs."""

    name = "temporal_consistency"
    description = ("Temporal consistency: the mean CLIP similarity of neighbouring frames, near 1 for a steady clip, "
                   "lower where frames flicker or jump; higher is better.")
    reads_clips = True

    @torch.no_grad()
    def embed(self, frames: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings of (M, 3, H, W) frames in [0, 1], ``batch_size`` at a time."""
        return torch.cat([F.normalize(self._embed(frames[start:start + self.batch_size]), dim=-1).cpu()
                          for start in range(0, len(frames), self.batch_size)])

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.dim() != 5 or images.shape[2] < 2:
            raise UserError("temporal_consistency scores clips of two frames or more: train a video model with "
                            "data.frames > 1")
        n, channels, f = images.shape[:3]
        features = self.embed(images.transpose(1, 2).reshape(n * f, channels, *images.shape[3:])).view(n, f, -1)
        return (features[:, 1:] * features[:, :-1]).sum(-1).mean(dim=1)
