"""The toy worlds' programmatic reward models: the image world's preference and prompt-adherence judge, and the
video world's (:mod:`diffalign.toy.video_judge`)."""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.toy.judge import adheres, images_to_arrays, measure, preference_scores, soft_preference_scores
from diffalign.toy.video_judge import video_adherence, video_preference_scores
from diffalign.toy.world import parse_caption

TOY_REWARDS = ("toy_preference", "toy_adherence", "toy_preference_soft")
TOY_VIDEO_REWARDS = ("toy_video_preference", "toy_video_adherence")


def check_toy_prompts(prompts: Sequence[str], reward: str = "the toy rewards") -> None:
    """Stop with the fix when a prompt is no toy-world caption: the toy rewards judge colour and shape."""
    other = next((p for p in prompts if parse_caption(p) is None), None)
    if other is not None:
        raise UserError(f"{reward} can judge only toy-world prompts (a colour and a shape, 'a red circle'), and "
                        f"{other!r} is not one. Score other prompts with reward models that fit them, e.g. "
                        "--rewards pickscore:yuvalkirstain/PickScore_v1,hps_v2.1:xswu/HPSv2/HPS_v2.1_compressed.pt "
                        "(validation.rewards in a training config); `diffalign eval --help` lists the specs")


class ToyPreference:
    """The toy world's "human": pictures of what was asked, larger and more centred, score higher
    (see ``preference_score``)."""

    name = "toy_preference"
    description = ("The toy world's stand-in for a person's taste: a picture of what was asked scores higher the "
                   "larger and more centred its shape (about -0.5 to 0.7), and one of the wrong colour or shape "
                   "1 lower than that; higher is better.")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_toy_prompts(prompts, self.name)
        return preference_scores(images, prompts)


class ToyAdherence:
    """1 when the image shows the prompt's colour and shape, else 0."""

    name = "toy_adherence"
    description = ("The toy world's judge of prompt adherence: 1 when the image shows the prompt's colour and "
                   "shape, else 0, so its mean is the share of images that do; higher is better.")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_toy_prompts(prompts, self.name)
        return torch.tensor([adheres(measure(im), p) for im, p in zip(images_to_arrays(images), prompts)])


class ToyPreferenceSoft:
    """The toy preference made differentiable (:func:`diffalign.toy.judge.soft_preference_scores`), for the methods
    that fine-tune through a reward's gradient; train on it, and judge with ``toy_preference``."""

    name = "toy_preference_soft"
    description = ("A differentiable stand-in for the toy preference: larger, more centred shapes of the asked "
                   "colour score higher (about -1.5 to 0.7), the kind of shape not judged; higher is better.")
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.score_with_gradient(images, prompts).cpu()

    def score_with_gradient(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) scores on the images' device, differentiable in the images."""
        check_toy_prompts(prompts, self.name)
        return soft_preference_scores(images, prompts)


class _ToyVideoJudge:
    """A toy video world judge: reads whole clips (N, 3, F, H, W) of toy prompts."""

    reads_clips = True
    name: str

    def check(self, clips: torch.Tensor, prompts: Sequence[str]) -> None:
        if clips.dim() != 5 or clips.shape[2] < 3:
            raise UserError(f"{self.name} judges how a shape moves over 3 frames or more; it got "
                            f"{'images' if clips.dim() == 4 else f'{clips.shape[2]}-frame clips'}: sample clips "
                            "(data.frames, --frames) from a video model")
        check_toy_prompts(prompts, self.name)


class ToyVideoPreference(_ToyVideoJudge):
    """The toy video world's "human": the asked shape moving smoothly at constant speed scores highest
    (:func:`diffalign.toy.video_judge.clip_preference_score`)."""

    name = "toy_video_preference"
    description = ("The toy video world's stand-in for a person's taste: a clip of the asked shape moving scores "
                   "higher the smoother and steadier its motion (0 at constant speed along a line, -1 for a shaky "
                   "path), and one that does not show a shape of the asked colour moving 1 lower (the kind of shape "
                   "is toy_video_adherence's); higher is better.")

    def __call__(self, clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check(clips, prompts)
        return video_preference_scores(clips, prompts)


class ToyVideoAdherence(_ToyVideoJudge):
    """1 when the clip shows the prompt's colour and shape moving, else 0."""

    name = "toy_video_adherence"
    description = ("The toy video world's judge of prompt adherence: 1 when most frames show the prompt's colour and "
                   "shape, every frame a shape, and it travels, else 0; higher is better.")

    def __call__(self, clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check(clips, prompts)
        return video_adherence(clips, prompts)
