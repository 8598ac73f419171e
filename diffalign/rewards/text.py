"""Rewards of text completions: the toy text world's preference and judge, any transformers sequence
classifier (a reward model such as a Skywork or ArmoRM checkpoint saved locally), and a general preference
model (``gpm:PATH``, :mod:`diffalign.rewards.general_preference`) and the policy judging itself (``self_judge``,
:mod:`diffalign.rewards.self_judge`), which compare a group's completions.

A text reward is called as ``reward(completions, prompts)`` and returns one score per completion
(higher is better), as the image rewards take images and prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from diffalign.errors import UserError
from diffalign.rewards.density_ratio import PREFIX as CDR, DensityRatioReward
from diffalign.rewards.general_preference import PREFIX as GPM, GeneralPreferenceReward
from diffalign.rewards.self_judge import SelfJudge, is_self_judge
from diffalign.toy import text_world


class TextReward:
    """A named scoring function of (completions, prompts)."""

    def __init__(self, name: str, description: str, score: Callable[[str, str], float]) -> None:
        self.name, self.description, self._score = name, description, score

    def __call__(self, completions: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._score(c, p) for c, p in zip(completions, prompts, strict=True)])


class SequenceClassifierReward:
    """A transformers sequence classifier scoring prompt + completion: its single logit, or for two labels the
    second minus the first."""

    description = "A sequence-classifier reward model's score of prompt + completion; higher is better."

    def __init__(self, path: str | Path, batch_size: int = 16) -> None:
        from diffalign.lm.loading import load_sequence_classifier

        self.model, self.tokenizer = load_sequence_classifier(path, "reward classifier:")
        self.name, self.batch_size = "classifier", batch_size

    @torch.no_grad()
    def __call__(self, completions: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True)
            logits = self.model(**batch).logits.float()
            scores.append(logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0])
        return torch.cat(scores)


TEXT_REWARDS = {
    "toy_text_preference": lambda: TextReward(
        "toy_text_preference", "The toy text world's preference: the valence of the completion's mood word "
        "(joyful 1.0 ... angry -1.0); higher is better.", lambda completion, prompt: text_world.preference_score(completion)),
    "toy_text_judge": lambda: TextReward(
        "toy_text_judge", "The toy text judge: 1 for a grammatical sentence naming the prompt's colour and animal, "
        "0.5 for one naming others, 0 otherwise.", text_world.judge_score),
}


CLASSIFIER = "classifier:"


def is_text_reward(spec: object) -> bool:
    """Whether ``spec`` names a text reward: one of ``TEXT_REWARDS``, ``classifier:PATH``, ``cdr:STRONG:WEAK``,
    ``gpm:PATH`` or ``self_judge``."""
    return isinstance(spec, str) and (spec in TEXT_REWARDS or spec.startswith((CLASSIFIER, CDR, GPM))
                                      or is_self_judge(spec))


def is_preference_table_reward(spec: object) -> bool:
    """Whether ``spec`` names a reward that compares a group's completions (``gpm:PATH``, ``self_judge``) instead
    of scoring each."""
    return isinstance(spec, str) and (spec.startswith(GPM) or is_self_judge(spec))


def load_text_reward(spec: str, policy: torch.nn.Module | None = None, tokenizer: Any = None):
    """A text reward by name (``toy_text_preference``, ``toy_text_judge``), ``classifier:PATH``, ``cdr:STRONG:WEAK``
    (two LMs' log-likelihood ratio, :mod:`diffalign.rewards.density_ratio`), ``gpm:PATH`` (a general preference
    model: :class:`~diffalign.rewards.general_preference.GeneralPreferenceReward`, whose ``tables`` compare a group's
    completions) or ``self_judge`` (``policy`` judging its own completions, read with ``tokenizer``:
    :class:`~diffalign.rewards.self_judge.SelfJudge`)."""
    if not is_text_reward(spec):
        raise UserError(f"text reward {spec!r} is not known; use {', '.join(TEXT_REWARDS)}, {CLASSIFIER}PATH (a "
                        f"local transformers sequence classifier), {CDR}STRONG:WEAK (two LMs' density ratio), "
                        f"{GPM}PATH (a general preference model) or self_judge (the policy judging itself)")
    if is_self_judge(spec):
        if policy is None:
            raise UserError(f"{spec}: the self judge is the policy being trained; it is an online.reward of the "
                            "LM loops, not a reward of a fixed model")
        return SelfJudge.parse(spec, policy, tokenizer)
    if spec in TEXT_REWARDS:
        return TEXT_REWARDS[spec]()
    if spec.startswith(CDR):
        return DensityRatioReward.parse(spec)
    if spec.startswith(GPM):
        return GeneralPreferenceReward(spec.removeprefix(GPM))
    return SequenceClassifierReward(spec.removeprefix(CLASSIFIER))
