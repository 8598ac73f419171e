"""A vision-language judge behind an OpenAI-compatible chat endpoint (what vLLM, SGLang and ``transformers serve``
serve): each image goes to the judge with a question about its prompt, and the score is read from the reply.

This is how the peers run UnifiedReward and other VLM scorers: Flow-GRPO's ``unifiedreward_score_sglang``
(``flow_grpo/rewards.py``) sends each image, resized to 512 x 512, as a base64 data URL with its question at
temperature 0, and reads "Final Score: N" (1 to 5) from the answer, divided by 5. A judge is a template: the
question (``{prompt}`` is the image's prompt) and how to read the score. Flow-GRPO's question starts with a literal
``<image>`` line; here the image goes only as its ``image_url`` part, which the server's chat template places (a
LLaVA-style tokenizer would otherwise see two image tokens for one image, and refuse).

| template | question | score |
| --- | --- | --- |
| ``unifiedreward`` | Flow-GRPO's UnifiedReward question: alignment with the caption and image quality, 1 to 5 | N / 5 from "Final Score: N" |
| ``yes_no`` | VQAScore's 'Does this figure show "{prompt}"? Please answer yes or no.' | 1 for an answer that starts with yes, 0 for no |
| ``score_10`` | how well the image matches the prompt, 0 to 10 | N / 10 from "Score: N" |

``question=`` and ``pattern=`` (a regular expression whose first group is the number; ``scale=`` divides it) make
a judge of one's own. Requests go out ``concurrency`` at a time (the server batches them), each retried on network
and server errors (:mod:`diffalign.rewards.json_client`); an answer no score can be read from is an error naming the
endpoint, the model, the prompt and the answer, where Flow-GRPO scores it 0. ``$OPENAI_API_KEY``, when set, is sent
as the bearer token (vLLM's and SGLang's ``--api-key``).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import to_pil
from diffalign.rewards.json_client import JsonEndpoint, png_base64

API_KEY_ENV = "OPENAI_API_KEY"

UNIFIEDREWARD_QUESTION = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with "
    "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
    "described in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, "
    "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]")


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge's question (``{prompt}`` filled in) and how its answer becomes a score: the first group of
    ``pattern`` (searched, case-insensitively) divided by ``scale``, or looked up in ``words``."""

    question: str
    pattern: str
    scale: float = 1.0
    words: tuple[tuple[str, float], ...] = ()

    def read(self, answer: str) -> float | None:
        """The score in ``answer``, or None when the pattern does not find one."""
        match = re.search(self.pattern, answer, flags=re.IGNORECASE)
        if match is None:
            return None
        if self.words:
            return dict(self.words)[match.group(1).lower()]
        return float(match.group(1)) / self.scale


TEMPLATES = {
    "unifiedreward": JudgeTemplate(UNIFIEDREWARD_QUESTION, r"Final Score:\s*([1-5](?:\.\d+)?)", 5.0),
    "yes_no": JudgeTemplate('Does this figure show "{prompt}"? Please answer yes or no.', r"^\W*(yes|no)\b",
                            words=(("yes", 1.0), ("no", 0.0))),
    "score_10": JudgeTemplate('How well does this image show "{prompt}"? Rate it from 0 (not at all) to 10 '
                              "(perfectly), and end your answer with 'Score: N'.",
                              r"Score:\s*(10(?:\.0+)?|\d(?:\.\d+)?)", 10.0),
}


def data_url(image: Image.Image) -> str:
    """The image as a PNG data URL, the form OpenAI-compatible servers take images in."""
    return "data:image/png;base64," + png_base64(image)


class OpenAIJudge:
    """A VLM judge at an OpenAI-compatible endpoint (``url``: the server's base URL, ending in ``/v1``)."""

    name = "openai_judge"
    description = ("VLM judge at an OpenAI-compatible endpoint: the score read from its answer to a question about "
                   "the image and its prompt (UnifiedReward: 1-5 over 5), in [0, 1]; higher is better.")

    def __init__(self, url: str, *, template: str = "unifiedreward", model: str | None = None,
                 question: str | None = None, pattern: str | None = None, scale: float | str = 1.0,
                 image_size: int | str = 512, max_tokens: int | str | None = None, concurrency: int | str = 8,
                 timeout: float | str = 300, retries: int | str = 3, retry_wait: float | str = 5.0) -> None:
        if template not in TEMPLATES:
            raise UserError(f"openai_judge: template {template!r} is not one of {', '.join(TEMPLATES)}")
        chosen = TEMPLATES[template]
        if question is not None or pattern is not None:
            if pattern is None or question is None:
                raise UserError("openai_judge: a judge of your own needs both question= (with {prompt}) and "
                                "pattern= (a regular expression whose first group is the score)")
            chosen = JudgeTemplate(question, pattern, float(scale))
        if "{prompt}" not in chosen.question:
            raise UserError("openai_judge: the question must hold {prompt}, where each image's prompt goes")
        self.template, self.template_name = chosen, template if question is None else "question="
        self.image_size = int(image_size)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.concurrency = int(concurrency)
        self.endpoint = JsonEndpoint(url.rstrip("/"), "the judge endpoint", os.environ.get(API_KEY_ENV),
                                     f"set ${API_KEY_ENV} to the server's --api-key", float(timeout), int(retries),
                                     float(retry_wait))
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        """The one model the endpoint serves (``GET /models``), for a spec that names none."""
        listed = self.endpoint.call("GET", "/models")
        models = [m.get("id") for m in listed.get("data", [])] if isinstance(listed, dict) else []
        if len(models) != 1 or not isinstance(models[0], str):
            raise UserError(f"the judge endpoint at {self.endpoint.url} serves {models or 'no models'}; name the "
                            "judge with model=NAME")
        return models[0]

    def ask(self, image: Image.Image, prompt: str) -> str:
        """The judge's answer about one image and its prompt."""
        return self.ask_about([image], self.template.question.replace("{prompt}", prompt))

    def ask_about(self, images: list[Image.Image], question: str) -> str:
        """The judge's answer to ``question`` about ``images``, sent in order before the question."""
        if self.image_size:
            images = [image.resize((self.image_size, self.image_size)) for image in images]
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        reply = self.endpoint.call("POST", "/chat/completions", body)
        try:
            answer = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"the judge endpoint at {self.endpoint.url} answered {str(reply)[:200]!r}, not a chat "
                            "completion") from None
        if not isinstance(answer, str):
            raise UserError(f"the judge endpoint at {self.endpoint.url} answered with no text: {str(reply)[:200]!r}")
        return answer

    def score(self, answer: str, prompt: str) -> float:
        """The score the template reads in ``answer``; an error naming the endpoint when there is none."""
        value = self.template.read(answer)
        if value is None:
            raise UserError(f"the judge {self.model} at {self.endpoint.url} answered {answer[:300]!r} for the prompt "
                            f"{prompt!r}; the {self.template_name} template reads its score with "
                            f"{self.template.pattern!r} and found none (another template=, or max_tokens= if the "
                            "answer was cut short)")
        return value

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self.ask, to_pil(images), prompts))
        return torch.tensor([self.score(answer, prompt) for answer, prompt in zip(answers, prompts)])
