"""Prompts and completions to token ids, and token ids to the batches the LM losses read.

The rule is TRL's (``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``, TRL 1.x), so a
dataset tokenizes to the same ids in diffalign and in TRL: a plain-text completion gets the
tokenizer's EOS appended when it lacks one; prompt and prompt + completion are tokenized whole
(a conversation through the tokenizer's chat template, the prompt with the generation prompt
added), and the completion starts where the two token lists first differ, since tokens may merge
across the boundary. A sequence longer than ``max_length`` keeps its start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from diffalign.lm.packing import pack

Tensor = torch.Tensor


def is_conversation(value: Any) -> bool:
    """A list of {"role", "content"} messages (TRL's conversational format), as opposed to plain text."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def split_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit-prompt format: two whole conversations that share their first messages. Returns
    (prompt, chosen completion, rejected completion), the prompt being the longest shared start."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, text_or_messages: Any, **template: Any) -> list[int]:
    if is_conversation(text_or_messages):
        ids = tokenizer.apply_chat_template(text_or_messages, tokenize=True, **template)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text_or_messages)["input_ids"])


@dataclass(frozen=True)
class TokenizedGroup:
    """One prompt's token ids and those of its K completions (best first for a pair or a ranked list); with a step
    pattern, each completion token's step number (:func:`step_numbers`)."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    steps: tuple[tuple[int, ...], ...] | None = None


class NoStepsError(ValueError):
    """A completion in which the step pattern marks no step; ``completion`` is its position in the list."""

    def __init__(self, completion: int, pattern: str) -> None:
        super().__init__(f"completion {completion} has no step: nothing in it matches the step pattern {pattern!r}")
        self.completion = completion


def step_numbers(offsets: Sequence[tuple[int, int]], text: str, start: int, pattern: str) -> list[int]:
    """The step of each token whose characters in ``text`` begin at ``offsets`` (a fast tokenizer's offset mapping
    of the completion's tokens; the completion starts at character ``start``): the number of ``pattern`` matches in
    the completion that begin at or before the token's first character, 0 before the first one (TPO's
    ``step_index``, whose pattern is ``\\nStep \\d+:``)."""
    starts = [m.start() + start for m in re.finditer(pattern, text[start:])]
    return [sum(first <= begin for first in starts) for begin, _ in offsets]


def tokenize_group(tokenizer, prompt: Any, completions: Sequence[Any], step_pattern: str | None = None
                   ) -> TokenizedGroup:
    """Token ids of a prompt and its completions by TRL's rule (module docstring).

    ``prompt`` and each completion are both plain strings or both conversations (message lists).
    The prompt's ids are cut where any completion's full tokenization departs from them, so that
    prompt + completion is exactly what the model reads for every completion. ``step_pattern`` (a regular
    expression, plain-text completions) also numbers each completion token's step (:func:`step_numbers`), the
    steps past the fewest that a completion of the group has folded into the last common one, as TPO's data
    (Liao et al. 2024); a completion with no step raises :class:`NoStepsError`.
    """
    if is_conversation(prompt):
        if step_pattern is not None:
            raise ValueError("a step pattern reads plain-text completions; these are conversations")
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_ids(tokenizer, prompt + completion) for completion in completions]
    else:
        if step_pattern is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError("a step pattern needs a fast tokenizer (its offset mapping says which characters each "
                             f"token covers); {type(tokenizer).__name__} is not one")
        eos = tokenizer.eos_token or ""
        texts = [c if c.endswith(eos) else c + eos for c in completions]
        prompt_ids = _ids(tokenizer, prompt)
        # one tokenization per completion gives its ids and, with a step pattern, the characters behind each token
        encoded = [tokenizer(prompt + text, return_offsets_mapping=step_pattern is not None) for text in texts]
        full = [list(e["input_ids"]) for e in encoded]
    cut = min(_common_prefix(prompt_ids, ids) for ids in full)
    group = TokenizedGroup(tuple(prompt_ids[:cut]), tuple(tuple(ids[cut:]) for ids in full))
    if step_pattern is None:
        return group
    steps = [step_numbers(e["offset_mapping"][cut:], prompt + text, len(prompt), step_pattern)
             for e, text in zip(encoded, texts)]
    for k, numbers in enumerate(steps):
        if not any(numbers):
            raise NoStepsError(k, step_pattern)
    common = min(max(numbers) for numbers in steps)
    return TokenizedGroup(group.prompt, group.completions, tuple(tuple(min(n, common) for n in s) for s in steps))


def collate(groups: Sequence[TokenizedGroup], *, pad_token_id: int, max_length: int | None,
            packed: bool = False) -> dict[str, Tensor]:
    """A rank-major batch of B groups of K completions: (K * B, T) ``input_ids``, ``attention_mask`` and
    ``completion_mask``, row k * B + i the k-th completion of group i, right-padded (a pair batch: the B
    chosen rows, then the B rejected ones, as :func:`diffalign.lm.preference_loss` and TRL read it). Each
    sequence is cut to ``max_length`` tokens, keeping its start (TRL's ``keep_start``). Groups tokenized with a step
    pattern add each token's step as ``step_index``. ``packed`` adds the
    packed layout of :func:`diffalign.lm.packing.pack`, which the scores then run on."""
    rows, masks, steps = [], [], []
    numbered = all(group.steps is not None for group in groups)
    for k in range(len(groups[0].completions)):
        for group in groups:
            ids = list(group.prompt) + list(group.completions[k])
            mask = [0] * len(group.prompt) + [1] * len(group.completions[k])
            rows.append(torch.tensor(ids[:max_length]))
            masks.append(torch.tensor(mask[:max_length]))
            if numbered:
                steps.append(torch.tensor(([0] * len(group.prompt) + list(group.steps[k]))[:max_length]))
    batch = {
        "input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(r) for r in rows], batch_first=True),
        "completion_mask": pad_sequence(masks, batch_first=True),
    }
    if numbered:  # each token's step (tokenize_group's step_pattern): 0 on the prompt and the padding
        batch["step_index"] = pad_sequence(steps, batch_first=True)
    return {**batch, **pack(batch, pad_token_id=pad_token_id)} if packed else batch
