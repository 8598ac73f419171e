"""The toy world's programmatic reward models: its preference and its prompt-adherence judge."""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.toy.judge import adheres, images_to_arrays, measure, preference_scores, soft_preference_scores
from diffalign.toy.world import parse_caption

TOY_REWARDS = ("toy_preference", "toy_adherence", "toy_preference_soft")


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
