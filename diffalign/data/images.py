"""Captioned images, one row per image: without preferences (Self-NPO's and DDO's layout), or
with a binary label each (Diffusion-KTO's layout: liked or not).

Columns (names configurable): ``caption`` and ``image`` (encoded bytes, or a path relative to
a .jsonl index), and with labels a ``label`` column: 1 / true for a desirable image, 0 / false
for an undesirable one. A parquet file/folder, a ``datasets`` folder or a .jsonl index, as for
pairs, or a plain folder of images with a ``.txt`` caption beside each (``photo.jpg`` and
``photo.txt``; no labels). Any captioned images work: real photos, or the model's own samples,
which makes Self-NPO need no data beyond the model itself. Bad rows are skipped and counted, or raise; a row
whose label is missing or not binary is dropped when the table loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from diffalign.data.video import VideoClips
from diffalign.data.pairs import DEFAULT_MAX_IMAGE_PIXELS, BadRow, GroupExample, ImageRows
from diffalign.errors import UserError


def binary_label(value: object, index: int, column: str) -> float | BadRow:
    """1.0 (desirable) or 0.0 (undesirable) from a bool or a 0/1 number; BadRow otherwise."""
    if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)) \
            and value in (0, 1):
        return float(value)
    return BadRow(index, column, f"label must be 1/true (desirable) or 0/false (undesirable), got {value!r}")


class CaptionedImageDataset(ImageRows):
    """Each row as a group of one image (K = 1), so the trainer batches it like pairs and lists.

    With ``label_column`` each example's ``preference`` is its label (1.0 desirable, 0.0 not).
    """

    def __init__(self, path: str | Path, *, resolution: int, caption_column: str = "caption",
                 image_column: str = "image", label_column: str | None = None, on_error: str = "skip",
                 split: str = "train", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 source_columns: Sequence[str] = (), video: VideoClips | None = None, width: int | None = None) -> None:
        labelled = [label_column] if label_column else []
        super().__init__(path, resolution=resolution, required=[caption_column, image_column, *labelled],
                         on_error=on_error, split=split, max_image_pixels=max_image_pixels,
                         source_columns=source_columns, video=video, width=width)
        self.caption_column, self.image_column = caption_column, image_column
        self.labels: list[float] | None = None
        if label_column:
            labels = [binary_label(v, i, label_column) for i, v in enumerate(self.source.column(label_column))]
            for label in labels:
                if isinstance(label, BadRow):
                    self.count_bad(label)
            self.indices = [i for i, label in enumerate(labels) if not isinstance(label, BadRow)]
            self.labels = labels
            if not self.indices:
                raise UserError(f"data.path {path} has no row with a usable label in column {label_column!r}")

    def positions_by_label(self) -> tuple[list[int], list[int]]:
        """The positions (of the usable rows) of the liked images and of the others."""
        if self.labels is None:
            raise ValueError("positions_by_label needs a dataset read with label_column")
        liked = [position for position, index in enumerate(self.indices) if self.labels[index] == 1.0]
        return liked, [position for position, index in enumerate(self.indices) if self.labels[index] != 1.0]

    def read(self, position: int, decode: bool = True) -> GroupExample:
        """The image at ``position`` (of the usable rows) as a group of one; raises :class:`BadRow`."""
        index = self.indices[position]
        row = self.source.row(index)
        caption = self._caption(row, index, self.caption_column)
        pixels, image_id = self._decode(row.get(self.image_column), index, self.image_column, decode)
        preference = 1.0 if self.labels is None else self.labels[index]
        return GroupExample(index, caption, None if pixels is None else pixels[None], (image_id,),
                            preference=preference, **self._sources(row, index, decode))
