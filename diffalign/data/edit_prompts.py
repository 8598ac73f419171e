"""The prompts of online rounds on an edit model: an instruction and its source images per row.

Edit GRPO (Flow-GRPO's and Flow-Factory's Qwen-Image-Edit runs) samples each group as edits of one row's source
images. ``online.prompts`` is then a table or a .jsonl index (images as paths beside it) with the instruction in
``data.caption_column`` and the sources in ``data.source_columns``; every row's sources are decoded once as the run
starts, so a bad image is counted and skipped there (``data.on_error``), never met halfway through a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffalign.data.pairs import DEFAULT_MAX_IMAGE_PIXELS, GroupExample, ImageRows
from diffalign.errors import UserError


class EditPrompts(ImageRows):
    """Rows of an instruction and its source images, as groups of no items (``pixels`` None, ``sources`` set)."""

    def __init__(self, path: str | Path, *, resolution: int, caption_column: str, source_columns: Sequence[str],
                 on_error: str = "skip", split: str = "train",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, width: int | None = None) -> None:
        super().__init__(path, resolution=resolution, required=[caption_column], on_error=on_error, split=split,
                         max_image_pixels=max_image_pixels, source_columns=source_columns, width=width)
        self.caption_column = caption_column
        readable = [example for position in self.indices if (example := self.example(position)) is not None]
        self.indices = [example.index for example in readable]  # every row until then, so a position is a row
        self.captions = [example.caption for example in readable]  # the instructions, by position
        if not self.indices:
            raise UserError(f"{path} has no row whose instruction and source images can be read")

    def read(self, position: int, decode: bool = True) -> GroupExample:
        index = self.indices[position]
        row = self.source.row(index)
        return GroupExample(index, self._caption(row, index, self.caption_column), None, (),
                            **self._sources(row, index, decode))
