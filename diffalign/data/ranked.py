"""Ranked-list preference data (RankDPO's Syn-Pic layout): one row per prompt, K images and their scores.

Columns (names configurable): ``caption``; ``images``, a list of encoded images (bytes, or
paths relative to a .jsonl index); ``scores``, a list of floats, one per image, higher is
better (e.g. the mean of several reward models, or minus the mean rank). Other columns (the raw
score of every reward model, the generator of each image) are kept in the file and ignored here.
A parquet file/folder, a ``datasets`` folder or a .jsonl index, as for pairs.

Every list must hold the same number of images K (a batch is B x K images); a row whose list
length differs, whose scores are NaN, or whose image cannot be decoded is a bad row (skipped and
counted, or an error with ``on_error="raise"``). Images are returned best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.data.video import VideoClips
from diffalign.data.pairs import DEFAULT_MAX_IMAGE_PIXELS, BadRow, GroupExample, ImageRows, is_finite_number
from diffalign.errors import UserError


class RankedListDataset(ImageRows):
    def __init__(
        self,
        path: str | Path,
        *,
        resolution: int,
        caption_column: str = "caption",
        images_column: str = "images",
        scores_column: str = "scores",
        on_error: str = "skip",
        split: str = "train",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        source_columns: Sequence[str] = (),
        video: VideoClips | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__(path, resolution=resolution, required=[caption_column, images_column, scores_column],
                         on_error=on_error, split=split, max_image_pixels=max_image_pixels,
                         source_columns=source_columns, video=video, width=width)
        self.caption_column, self.images_column, self.scores_column = caption_column, images_column, scores_column
        lengths = self.source.list_lengths(images_column)  # not the images: they stay on disk until read
        usable = [n for n in lengths if n >= 2]
        if not usable:
            raise UserError(f"data.path {path}: no row of '{images_column}' holds a list of two or more images")
        self.list_size = max(set(usable), key=usable.count)  # the common list length
        self.indices: list[int] = []
        for i, (n, scores) in enumerate(zip(lengths, self.source.column(scores_column))):
            if n != self.list_size:
                self.count_bad(BadRow(i, images_column, f"holds {n} images where the lists hold {self.list_size}"))
            elif not isinstance(scores, (list, tuple)) or len(scores) != n:
                self.count_bad(BadRow(i, scores_column, f"needs one score per image ({n})"))
            elif not all(is_finite_number(s) for s in scores):
                self.count_bad(BadRow(i, scores_column, f"a score is missing or not a finite number ({scores!r:.80})"))
            else:
                self.indices.append(i)
        if not self.indices:
            raise UserError(f"data.path {path} has no usable ranked list")

    def read(self, position: int, decode: bool = True) -> GroupExample:
        """The list at ``position``, best first; raises :class:`BadRow`."""
        index = self.indices[position]
        row = self.source.row(index)
        caption = self._caption(row, index, self.caption_column)
        decoded = [self._decode(value, index, self.images_column, decode) for value in row[self.images_column]]
        scores = torch.tensor([float(s) for s in row[self.scores_column]])
        order = torch.argsort(scores, descending=True, stable=True)
        pixels = torch.stack([decoded[i][0] for i in order]) if decode else None
        return GroupExample(index, caption, pixels, tuple(decoded[i][1] for i in order), scores=scores[order],
                            **self._sources(row, index, decode))
