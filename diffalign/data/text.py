"""Text preference datasets in TRL's formats, tokenized as they are read (:mod:`diffalign.lm.tokenize`).

- pairs: ``prompt``, ``chosen``, ``rejected`` (the chosen completion first, as TRL's preference
  format); plain text or conversations (lists of {"role", "content"} messages, read through the
  tokenizer's chat template). Without a prompt column, conversational ``chosen`` and ``rejected``
  are whole conversations whose shared first messages are the prompt (TRL's implicit prompt).
- unpaired: ``prompt``, ``completion``, ``label`` (true for a desirable completion), KTO's format.
- ranked: ``prompt``, ``completions`` (a list) and optionally ``scores`` (one per completion,
  higher better; without them the list is best first).
- completions: ``prompt``, ``completion`` (TRL's prompt-completion format), what a student is distilled on.

Every table that :class:`~diffalign.data.pairs.RowSource` reads works (parquet, a ``datasets``
folder, .jsonl). A row that cannot be used (a missing or empty prompt or completion, a missing
label, a prompt that fills ``max_length`` and leaves no completion token) is a bad row, skipped and
counted like an undecodable image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.data.images import binary_label
from diffalign.data.pairs import BadRow, ImageRows, per_pair_number
from diffalign.errors import UserError
from diffalign.lm.tokenize import NoStepsError, TokenizedGroup, is_conversation, split_prompt, tokenize_group

Tensor = torch.Tensor


@dataclass
class TextExample:
    """One prompt's tokenized completions as the LM objectives read them (best first for pairs and lists)."""

    index: int
    group: TokenizedGroup | None  # None when read without a tokenizer (a data check)
    label: bool | None = None  # unpaired: a desirable completion
    scores: Tensor | None = None  # ranked: (K,) scores, best first
    weight: float = 1.0  # pairs: data.weight_column
    margin: float | None = None  # pairs: data.margin_column
    reward_gap: float | None = None  # pairs: the chosen's minus the rejected's score in data.reward_columns
    preference: float = 1.0
    image_ids: tuple[str, ...] = ()  # nothing is cached for text


def _text(value: Any, index: int, column: str, what: str) -> Any:
    """A usable prompt or completion cell: non-empty text, or a conversation; else a :class:`BadRow`."""
    if is_conversation(value) or (isinstance(value, str) and value.strip()):
        return value
    raise BadRow(index, column, f"{what} is missing or empty")


class TextRows(ImageRows):
    """A table of prompts and completions with a tokenizer; the bad-row policy of the image datasets."""

    step_pattern: str | None = None  # ranked lists: data.step_pattern, TPO's steps

    def __init__(self, path: str | Path, *, tokenizer, max_length: int | None, required: list[str],
                 prompt_column: str, on_error: str = "skip", split: str = "train") -> None:
        super().__init__(path, resolution=0, required=required, on_error=on_error, split=split)
        self.tokenizer, self.max_length, self.prompt_column = tokenizer, max_length, prompt_column

    def _tokenized(self, index: int, prompt: Any, completions: list[Any], column: str) -> TokenizedGroup | None:
        """The prompt and completions tokenized; None without a tokenizer (``diffalign data check`` with no model
        checks the texts, not their tokens)."""
        if is_conversation(prompt) != is_conversation(completions[0]):
            raise BadRow(index, column, "prompt and completion must both be text or both be conversations")
        if self.step_pattern is not None and is_conversation(prompt):
            raise BadRow(index, column, "data.step_pattern reads plain-text completions; this row holds conversations")
        if self.tokenizer is None:
            return None
        try:
            group = tokenize_group(self.tokenizer, prompt, completions, self.step_pattern)
        except NoStepsError as error:
            raise BadRow(index, column, f"{error} (data.step_pattern)") from None
        if self.max_length is not None and len(group.prompt) >= self.max_length:
            raise BadRow(index, self.prompt_column, f"the prompt's {len(group.prompt)} tokens fill data.max_length="
                                                    f"{self.max_length}, leaving no completion token")
        return group


class TextPairDataset(TextRows):
    """Pairs (prompt, chosen, rejected); see the module docstring."""

    def __init__(self, path: str | Path, *, tokenizer, max_length: int | None = 1024, prompt_column: str = "prompt",
                 chosen_column: str = "chosen", rejected_column: str = "rejected", weight_column: str | None = None,
                 margin_column: str | None = None, reward_columns: tuple[str, str] | None = None,
                 on_error: str = "skip", split: str = "train") -> None:
        per_pair = [c for c in (weight_column, margin_column) if c is not None] + list(reward_columns or ())
        super().__init__(path, tokenizer=tokenizer, max_length=max_length, prompt_column=prompt_column,
                         required=[chosen_column, rejected_column, *per_pair], on_error=on_error, split=split)
        self.implicit_prompt = prompt_column not in self.source.columns
        self.chosen_column, self.rejected_column = chosen_column, rejected_column
        self.weight_column, self.margin_column = weight_column, margin_column
        self.reward_columns = tuple(reward_columns or ())

    @staticmethod
    def _number(row: dict, index: int, column: str | None, what: str, valid) -> float | None:
        """The pair's weight or margin (None without a column); raises :class:`BadRow` as the image pairs count it."""
        if column is None:
            return None
        value = per_pair_number(row.get(column), index, column, what, valid)
        if isinstance(value, BadRow):
            raise value
        return value

    def pair(self, position: int) -> tuple[Any, Any, Any]:
        """The (prompt, chosen, rejected) of the pair at ``position``, each text or messages; raises :class:`BadRow`."""
        index = self.indices[position]
        row = self.source.row(index)
        chosen = _text(row.get(self.chosen_column), index, self.chosen_column, "chosen completion")
        rejected = _text(row.get(self.rejected_column), index, self.rejected_column, "rejected completion")
        if self.implicit_prompt:
            if not (is_conversation(chosen) and is_conversation(rejected)):
                raise BadRow(index, self.prompt_column, "no prompt column, and chosen/rejected are not conversations "
                                                        "sharing their first messages")
            return split_prompt(chosen, rejected)
        return _text(row.get(self.prompt_column), index, self.prompt_column, "prompt"), chosen, rejected

    def ease(self) -> list[float]:
        """Each pair's ease for Curry-DPO's order (``data.curriculum=score_gap``): the gap between its chosen and
        rejected scores in ``data.reward_columns`` (a row whose scores cannot be read counts 0: reading it later skips
        it as a bad row)."""
        gaps = []
        for index in self.indices:
            row = self.source.row(index)
            try:
                chosen, rejected = (self._number(row, index, column, "reward score", lambda v: True)
                                    for column in self.reward_columns)
                gaps.append(abs(chosen - rejected))
            except BadRow:
                gaps.append(0.0)
        return gaps

    def narrow(self, positions: list[int]) -> None:
        """Keep only the pairs at ``positions`` (a selection such as UPO's reliable pairs)."""
        self.indices = [self.indices[p] for p in positions]

    def read(self, position: int, decode: bool = True) -> TextExample:
        index = self.indices[position]
        row = self.source.row(index)
        prompt, chosen, rejected = self.pair(position)
        weight = self._number(row, index, self.weight_column, "weight", lambda w: w >= 0)
        scores = [self._number(row, index, column, "reward score", lambda v: True) for column in self.reward_columns]
        return TextExample(index, self._tokenized(index, prompt, [chosen, rejected], self.chosen_column),
                           weight=1.0 if weight is None else weight,
                           margin=self._number(row, index, self.margin_column, "margin", lambda m: True),
                           reward_gap=scores[0] - scores[1] if scores else None)


class TextUnpairedDataset(TextRows):
    """Completions labelled one by one (prompt, completion, label); see the module docstring."""

    def __init__(self, path: str | Path, *, tokenizer, max_length: int | None = 1024, prompt_column: str = "prompt",
                 completion_column: str = "completion", label_column: str = "label", on_error: str = "skip",
                 split: str = "train") -> None:
        super().__init__(path, tokenizer=tokenizer, max_length=max_length, prompt_column=prompt_column,
                         required=[prompt_column, completion_column, label_column], on_error=on_error, split=split)
        self.completion_column, self.label_column = completion_column, label_column

    def texts(self, position: int) -> tuple[Any, Any, bool]:
        """The (prompt, completion, desirable) of the row at ``position``, untokenized; raises :class:`BadRow`."""
        index = self.indices[position]
        row = self.source.row(index)
        label = binary_label(row.get(self.label_column), index, self.label_column)
        if isinstance(label, BadRow):
            raise label
        prompt = _text(row.get(self.prompt_column), index, self.prompt_column, "prompt")
        completion = _text(row.get(self.completion_column), index, self.completion_column, "completion")
        return prompt, completion, label == 1.0

    def read(self, position: int, decode: bool = True) -> TextExample:
        prompt, completion, desirable = self.texts(position)
        index = self.indices[position]
        return TextExample(index, self._tokenized(index, prompt, [completion], self.completion_column),
                           label=desirable)


class TextCompletionDataset(TextRows):
    """Completions of prompts (prompt, completion), TRL's prompt-completion format; other columns (a label) are not
    read. What a student is distilled on (``lm_distill``)."""

    def __init__(self, path: str | Path, *, tokenizer, max_length: int | None = 1024, prompt_column: str = "prompt",
                 completion_column: str = "completion", on_error: str = "skip", split: str = "train") -> None:
        super().__init__(path, tokenizer=tokenizer, max_length=max_length, prompt_column=prompt_column,
                         required=[prompt_column, completion_column], on_error=on_error, split=split)
        self.completion_column = completion_column

    def read(self, position: int, decode: bool = True) -> TextExample:
        index = self.indices[position]
        row = self.source.row(index)
        prompt = _text(row.get(self.prompt_column), index, self.prompt_column, "prompt")
        completion = _text(row.get(self.completion_column), index, self.completion_column, "completion")
        return TextExample(index, self._tokenized(index, prompt, [completion], self.completion_column))


class TextRankedDataset(TextRows):
    """K completions per prompt (prompt, completions, scores); see the module docstring."""

    def __init__(self, path: str | Path, *, tokenizer, max_length: int | None = 1024, prompt_column: str = "prompt",
                 completions_column: str = "completions", scores_column: str = "scores", on_error: str = "skip",
                 split: str = "train", step_pattern: str | None = None) -> None:
        super().__init__(path, tokenizer=tokenizer, max_length=max_length, prompt_column=prompt_column,
                         required=[prompt_column, completions_column], on_error=on_error, split=split)
        self.completions_column, self.step_pattern = completions_column, step_pattern
        self.scores_column = scores_column if scores_column in self.source.columns else None
        sizes = set(self.source.list_lengths(completions_column))
        if len(sizes) != 1 or min(sizes) < 2:
            raise UserError(f"data.path {path}: every row's {completions_column!r} must list the same number (>= 2) "
                            f"of completions, as a batch of lists has one list size; found sizes {sorted(sizes)}")

    def read(self, position: int, decode: bool = True) -> TextExample:
        index = self.indices[position]
        row = self.source.row(index)
        prompt = _text(row.get(self.prompt_column), index, self.prompt_column, "prompt")
        completions = [_text(c, index, self.completions_column, "completion")
                       for c in row[self.completions_column]]
        scores = None
        if self.scores_column is not None:
            raw = row.get(self.scores_column)
            if not (isinstance(raw, list) and len(raw) == len(completions)
                    and all(isinstance(s, (int, float)) and math.isfinite(s) for s in raw)):
                raise BadRow(index, self.scores_column, "needs one finite score per completion")
            order = sorted(range(len(raw)), key=lambda k: -raw[k])  # best first
            completions = [completions[k] for k in order]
            scores = torch.tensor([float(raw[k]) for k in order])
        return TextExample(index, self._tokenized(index, prompt, completions, self.completions_column), scores=scores)
