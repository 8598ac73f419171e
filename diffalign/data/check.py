"""Read a dataset as a run would and say what is in it: ``diffalign data check PATH``.

A user with their own table wants to know, before a run, that diffalign reads it: which layout it is, how many
rows it holds, which rows a run would skip and why, and what one example looks like once read. The check opens
the table with the same code as the trainers (:func:`~diffalign.data.open.open_dataset`), reads every row (or
the first ``limit``) through the datasets' own bad-row policy, and reports.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from diffalign.data.open import LAYOUTS, open_dataset
from diffalign.data.pairs import ImageRows, RowSource
from diffalign.errors import UserError

# the columns that tell a layout apart, in the order they are tried (the config's default column names)
_SIGNATURES = [
    ("pairs", ("jpg_0", "jpg_1")),
    ("ranked", ("images", "scores")),
    ("labelled_images", ("image", "label")),
    ("images", ("image",)),
    ("text_ranked", ("completions",)),
    ("text_unpaired", ("completion", "label")),
    ("text_pairs", ("chosen", "rejected")),
    ("text_completions", ("completion",)),
]


def guess_layout(columns: list[str]) -> str:
    """The layout whose default columns the table has; a :class:`UserError` naming the layouts when none fits."""
    for layout, needed in _SIGNATURES:
        if all(column in columns for column in needed):
            return layout
    known = "; ".join(f"{layout}: {', '.join(needed)}" for layout, needed in _SIGNATURES)
    raise UserError(f"the columns {', '.join(columns)} are no layout diffalign reads by default ({known}). Give "
                    "--layout and the data.*_column keys that name your columns, or rename them.")


@dataclass
class DataReport:
    """What a check of one dataset found."""

    path: str
    layout: str
    rows: int  # rows in the table
    read: int  # rows read by the check
    bad: dict[tuple[int, str], str] = field(default_factory=dict)  # (row, column) -> where and why
    example: dict[str, Any] = field(default_factory=dict)  # the first usable row, described

    @property
    def usable(self) -> int:
        return self.read - len({index for index, _ in self.bad})

    def lines(self) -> list[str]:
        """The report as a person reads it."""
        out = [f"{self.path}: {self.rows:,} rows, layout {self.layout} ({LAYOUTS[self.layout]})"]
        checked = "every row" if self.read == self.rows else f"the first {self.read:,} rows"
        out.append(f"read {checked}: {self.usable:,} usable, {len({i for i, _ in self.bad}):,} bad")
        for column, count in sorted(Counter(column for _, column in self.bad).items()):
            out.append(f"  bad in column '{column}': {count:,}")
        for reason in list(self.bad.values())[:5]:
            out.append(f"  e.g. {reason}")
        if self.example:
            out.append("an example, as a run reads it:")
            out += [f"  {key}: {value}" for key, value in self.example.items()]
        return out


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _described(example: Any, layout: str, dataset: ImageRows) -> dict[str, Any]:
    """The fields of a read example a person checks: the prompt, the images' size, the label, the scores."""
    if layout.startswith("text_"):
        described = {"row": example.index}
        row = dataset.source.row(example.index)
        described.update({column: _short(row[column]) for column in dataset.source.columns
                          if isinstance(row.get(column), (str, list))})
        if example.group is not None:
            described["prompt tokens"] = len(example.group.prompt)
            described["completion tokens"] = [len(c) for c in example.group.completions]
        if example.label is not None:
            described["desirable"] = example.label
        if example.scores is not None:
            described["scores, best first"] = [round(float(s), 4) for s in example.scores]
        return described
    described = {"row": example.index, "caption": example.caption[:120]}
    if example.pixels is not None:
        described["images"] = f"{example.pixels.shape[0]} x {tuple(example.pixels.shape[1:])} (resized as a run does)"
    if example.sources is not None:
        described["source images"] = f"{example.sources.shape[0]} x {tuple(example.sources.shape[1:])}"
    if layout == "pairs":
        described["P(first image preferred)"] = example.preference
    if layout == "labelled_images":
        described["desirable"] = example.preference == 1.0
    if example.scores is not None:
        described["scores, best first"] = [round(float(s), 4) for s in example.scores]
    return described


def check_dataset(dc: Any, layout: str | None = None, *, tokenizer: Any = None, limit: int | None = None,
                  progress: bool = True) -> DataReport:
    """Read the dataset of the data settings ``dc`` (a config's ``data``) as a run would and report on it.

    ``layout`` None guesses it from the columns; ``limit`` reads only the first rows (a table of millions takes
    a while: every image is decoded). Bad rows are counted, never raised, whatever ``dc.on_error`` says.
    """
    if layout is None:
        layout = guess_layout(RowSource(dc.path, dc.split).columns)
        if layout in ("labelled_images", "text_unpaired"):  # guessed by its ``label`` column, which it reads
            dc = dataclasses.replace(dc, label_column="label")
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    dataset: ImageRows = open_dataset(dataclasses.replace(dc, on_error="skip"), layout, tokenizer)
    rows = len(dataset.source)
    read = min(limit, len(dataset)) if limit is not None else len(dataset)
    example = None
    for position in tqdm(range(read), desc="data check: reading rows", disable=not progress, file=sys.stderr):
        got = dataset.example(position)
        if example is None and got is not None:
            example = got
    # the table's rows up to the last one read; rows the dataset set aside as it opened (a bad label, a list of
    # another length) are among them
    covered = rows if read == len(dataset) else dataset.indices[read - 1] + 1
    bad = {key: why for key, why in dataset.bad_rows.items() if key[0] < covered}
    return DataReport(str(dc.path), layout, rows, covered, bad, _described(example, layout, dataset) if example is not None else {})
