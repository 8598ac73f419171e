"""A pairwise VLM judge behind an OpenAI-compatible chat endpoint: shown two images of one prompt, it says which is
better; a round's group of K images becomes K in-group win rates (Pref-GRPO; Wang et al. 2025, arXiv 2508.20751).

Pref-GRPO's reward is UnifiedReward-Think asked about every pair of a group (CodeGoat24/Pref-GRPO,
``fastvideo/rewards/unifiedreward_think.py``: ``cal_win_rate_images`` sends the pairs (i, j), i < j, image i first,
with the question of ``templates.get_unifiedreward_think_image_template``; ``_pairwise_win_rate`` reads
"Image 1 is better" or "Image 2 is better" inside ``<answer>`` tags and gives each image its wins over its
comparisons). Each image's reward is then the share of the other K - 1 it beats, in [0, 1], which no longer carries
the reward model's scale: the paper's remedy for the "illusory advantage" of near-equal pointwise scores. Here the
question is our own, asking for the same verdict in the same tags (``question=`` and ``pattern=`` change them). An
answer with no verdict is an error naming the endpoint and the answer, where the authors count it as a tie: a judge
that answers something else is misconfigured, and half a win for each image would hide it. ``both_orders=true`` asks
each pair in both orders and averages, against the position bias a judge may have (the authors ask once).

A pairwise judge scores groups, not single images: it is an ``online.reward`` of the round driver
(:meth:`diffalign.train.online.OnlineRounds._score`), and ``validation.rewards`` and ``diffalign eval`` refuse it.
Its ``train_reward`` is the mean win rate, always 1/2: the judge has no absolute scale, so a gold reward must come
from elsewhere.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import to_pil
from diffalign.rewards.openai_judge import OpenAIJudge

Tensor = torch.Tensor

PAIRWISE_QUESTION = (
    "You are given a text caption and two images generated from it: Image 1, shown first, and Image 2, shown "
    "second. Compare them on how faithfully each shows what the caption describes (its objects, their number, "
    "attributes and relations, and any text it asks for) and on image quality (clarity, detail, realism and "
    "aesthetic appeal). Reason briefly, then give your verdict inside <answer></answer> tags, exactly "
    "'Image 1 is better' or 'Image 2 is better'.\nCaption: [{prompt}]")
VERDICT = r"<answer>\s*Image\s*([12])\s*is better\s*</answer>"


def _flag(value: bool | str) -> bool:
    """A spec's true/false option (``both_orders=true``)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise UserError(f"pairwise_judge: {value!r} is not true or false")
    return str(value).lower() in ("true", "1", "yes")


class PairwiseJudge(OpenAIJudge):
    """A VLM that compares two images of a prompt at an OpenAI-compatible endpoint (``url`` ending in ``/v1``)."""

    name = "pairwise_judge"
    pairwise = True
    description = ("Pairwise VLM judge at an OpenAI-compatible endpoint: which of two images of a prompt is better; "
                   "a group's images become their in-group win rates, in [0, 1] (Pref-GRPO); online rounds only.")

    def __init__(self, url: str, *, model: str | None = None, question: str | None = None,
                 pattern: str | None = None, both_orders: bool | str = False, image_size: int | str = 512,
                 max_tokens: int | str | None = None, concurrency: int | str = 8, timeout: float | str = 300,
                 retries: int | str = 3, retry_wait: float | str = 5.0) -> None:
        super().__init__(url, model=model, question=question or PAIRWISE_QUESTION, pattern=pattern or VERDICT,
                         image_size=image_size, max_tokens=max_tokens, concurrency=concurrency, timeout=timeout,
                         retries=retries, retry_wait=retry_wait)
        self.template_name = "pairwise" if question is None else "question="
        self.both_orders = _flag(both_orders)

    def verdict(self, answer: str, prompt: str) -> float:
        """1 when the answer prefers the image shown first, 0 when the second; an error naming the endpoint when
        the answer holds no verdict."""
        value = self.template.read(answer)
        if value not in (1.0, 2.0):
            raise UserError(f"the pairwise judge {self.model} at {self.endpoint.url} answered {answer[:300]!r} for "
                            f"the prompt {prompt!r}; the {self.template_name} template reads its verdict (1 or 2) "
                            f"with {self.template.pattern!r} and found {'none' if value is None else value} "
                            "(another question=/pattern=, or max_tokens= if the answer was cut short)")
        return 1.0 if value == 1.0 else 0.0

    def _one(self, pair: tuple) -> float:
        first, second, prompt = pair
        return self.verdict(self.ask_about([first, second], self.template.question.replace("{prompt}", prompt)),
                            prompt)

    @torch.no_grad()
    def compare(self, first: Tensor, second: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) the share of each pair's verdicts won by ``first`` over ``second`` ((N, 3, H, W) in [0, 1]), of
        prompt ``prompts[i]``: 1, 0, or with ``both_orders`` the mean over the two orders (1/2 when they
        disagree)."""
        firsts, seconds = to_pil(first), to_pil(second)
        asked = list(zip(firsts, seconds, prompts))
        if self.both_orders:
            asked += list(zip(seconds, firsts, prompts))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            verdicts = torch.tensor(list(pool.map(self._one, asked)), dtype=torch.float64)
        if self.both_orders:
            n = len(prompts)
            verdicts = (verdicts[:n] + 1 - verdicts[n:]) / 2
        return verdicts

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        raise UserError("pairwise_judge compares two images of one prompt: it scores the groups of online rounds "
                        "(online.reward) as in-group win rates, not single images (validation.rewards, diffalign "
                        "eval); score those with a pointwise reward")


def pairwise_win_rates(judge, images: Tensor, prompts: Sequence[str], group_size: int) -> Tensor:
    """(N,) each image's win rate in its group: N images group-major, ``group_size`` K a group of one prompt; every
    pair (i, j), i < j, of a group judged once (``judge.compare``, image i first), and each image's wins (a verdict's
    share) over its K - 1 comparisons, as Pref-GRPO's ``_pairwise_win_rate``."""
    k = group_size
    if k < 2 or len(images) % k:
        raise UserError(f"a pairwise judge compares the images of a group: groups of {k} cannot be compared "
                        "(online.group_size must be >= 2)")
    pairs = [(start + i, start + j) for start in range(0, len(images), k) for i, j in itertools.combinations(range(k), 2)]
    first, second = (torch.tensor(index) for index in zip(*pairs))
    won = judge.compare(images[first], images[second], [prompts[i] for i in first.tolist()]).double()
    wins = torch.zeros(len(images), dtype=torch.float64)
    wins.index_add_(0, first, won).index_add_(0, second, 1 - won)
    return (wins / (k - 1)).float()
