"""Captioned images without preferences (Self-NPO's layout): one row per image.

Columns (names configurable): ``caption`` and ``image`` (encoded bytes, or a path relative to
a .jsonl index). A parquet file/folder, a ``datasets`` folder or a .jsonl index, as for pairs.
Any image folder with captions works: real photos, or the model's own samples, which makes
Self-NPO need no data beyond the model itself. Bad rows are skipped and counted, or raise.
"""

from __future__ import annotations

from pathlib import Path

from diffalign.data.pairs import GroupExample, ImageRows


class CaptionedImageDataset(ImageRows):
    """Each row as a group of one image (K = 1), so the trainer batches it like pairs and lists."""

    def __init__(self, path: str | Path, *, resolution: int, caption_column: str = "caption",
                 image_column: str = "image", on_error: str = "skip") -> None:
        super().__init__(path, resolution=resolution, required=[caption_column, image_column], on_error=on_error)
        self.caption_column, self.image_column = caption_column, image_column

    def __len__(self) -> int:
        return len(self.source)

    def read(self, position: int, decode: bool = True) -> GroupExample:
        """The image at ``position`` as a group of one; raises :class:`BadRow`."""
        row = self.source.row(position)
        caption = self._caption(row, position, self.caption_column)
        pixels, image_id = self._decode(row.get(self.image_column), position, self.image_column, decode)
        return GroupExample(position, caption, None if pixels is None else pixels[None], (image_id,))
