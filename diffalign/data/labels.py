"""Per-image labels from pairwise preferences: Diffusion-KTO's data made from a Pick-a-Pic-style table.

Diffusion-KTO (Li et al. 2024, arXiv 2404.04465, Sec. 4) trains on one binary label per image.
The authors derive the labels from Pick-a-Pic's pairs (their ``train_kto_sd_v1.5.py``, the
``--policy`` option): an image that won every comparison it was in is liked, one that lost
every comparison is not, and an image that both won and lost (their "intersections") is, by
their example's default ``gt_label_wi_l``, counted as liked; ``gt_label_w_il`` counts it as not
liked and ``gt_label_w_l`` drops it. :func:`pairs_to_labelled_images` does the same on any pairs
dataset :class:`~diffalign.data.PairDataset` reads: ``mixed="liked" | "disliked" | "drop"``.

An image is identified by its caption and the hash of its encoded bytes, so the same picture in
many pairs is one row. Ties and pairs of two identical images carry no win or loss (an image seen
only in those is left out), and a soft label counts as a win for the image it prefers. Bad rows
(missing image file, missing caption) are skipped and counted. Images are only hashed, not
decoded, unless ``verify=True``: then a pair with an image that does not decode is a counted bad
row too (decoding every image costs most of the run), instead of being counted by training.

The output is a folder, written whole or not at all: parquet shards with the columns ``caption``,
``image`` (encoded bytes), ``label`` (1 liked, 0 not), ``wins`` and ``losses``, or, when the
pairs come as a .jsonl index of image paths, an ``images.jsonl`` index whose paths point at the
same files (nothing is copied); and ``summary.json`` with the counts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.data.pairs import PairDataset, read_image_bytes
from diffalign.errors import UserError

MIXED_POLICIES = ("liked", "disliked", "drop")


@dataclass
class _ImageRecord:
    """Where an image first appears (row and column) and its tally over all pairs."""

    caption: str
    row: int
    column: str
    wins: int = 0
    losses: int = 0


def tally_images(pairs: PairDataset, verify: bool = False) -> tuple[dict[tuple[str, str], _ImageRecord], int]:
    """Every image of the usable pairs, keyed by (caption, content hash), in order of first appearance,
    and the number of pairs used: bad rows (with ``verify``, also undecodable images) are counted in
    ``pairs.skipped``, and a pair of two identical images is left out."""
    images: dict[tuple[str, str], _ImageRecord] = {}
    used = 0
    for position in range(len(pairs)):
        example = pairs.example(position, decode=verify)
        if example is None or example.image_ids[0] == example.image_ids[1]:  # a picture against itself tells nothing
            continue
        used += 1
        columns = pairs.image_columns if pairs.labels[example.index] >= 0.5 else pairs.image_columns[::-1]
        for place, (image_id, column) in enumerate(zip(example.image_ids, columns, strict=True)):
            record = images.setdefault((example.caption, image_id),
                                       _ImageRecord(example.caption, example.index, column))
            if place == 0:
                record.wins += 1
            else:
                record.losses += 1
    return images, used


def image_label(record: _ImageRecord, mixed: str) -> int | None:
    """1 (liked) or 0 (not) for an image's tally; None when ``mixed="drop"`` drops it."""
    if record.losses == 0:
        return 1
    if record.wins == 0:
        return 0
    return {"liked": 1, "disliked": 0, "drop": None}[mixed]


def pairs_to_labelled_images(pairs_path: str | Path, out: str | Path, *, mixed: str = "liked",
                             caption_column: str = "caption", image_columns: tuple[str, str] = ("jpg_0", "jpg_1"),
                             label_column: str = "label_0", rows_per_shard: int = 10_000,
                             split: str = "train", verify: bool = False) -> dict:
    """Write the per-image labelled dataset of a pairs dataset to the folder ``out``; returns the summary.

    ``mixed`` decides the images that both won and lost: ``"liked"`` (the authors' example),
    ``"disliked"`` or ``"drop"``. Refuses to write into an existing ``out``.
    """
    if mixed not in MIXED_POLICIES:
        raise UserError(f"mixed must be one of {', '.join(MIXED_POLICIES)}, got {mixed!r}")
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder (nothing is overwritten)")
    pairs = PairDataset(pairs_path, resolution=1, caption_column=caption_column, image_columns=image_columns,
                        label_column=label_column, ties="drop", split=split)
    images, used = tally_images(pairs, verify)
    labelled = [(record, label) for record in images.values()
                if (label := image_label(record, mixed)) is not None]
    if not labelled:
        raise UserError(f"{pairs_path} gives no labelled image (no usable pair, or every image dropped)")
    summary = {
        "pairs": str(pairs_path), "pairs_used": used, "bad_rows": dict(pairs.skipped), "images": len(images),
        "mixed": mixed, "won_and_lost": sum(1 for r in images.values() if r.wins and r.losses),
        "liked": sum(label for _, label in labelled), "not_liked": sum(1 - label for _, label in labelled),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # this run's own: nothing else is removed
    try:
        if pairs.source.path.suffix == ".jsonl":
            _write_index(pairs, labelled, tmp, out)
        else:
            _write_shards(pairs, labelled, tmp, rows_per_shard)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _rows(pairs: PairDataset, labelled: list[tuple[_ImageRecord, int]]) -> Iterator[tuple[_ImageRecord, int, object]]:
    """Each labelled image with its image cell as stored in the pairs table. Records come in row order (of
    first appearance), so each row is read once, not once per image."""
    index, row = -1, {}
    for record, label in labelled:
        if record.row != index:
            index, row = record.row, pairs.source.row(record.row)
        yield record, label, row.get(record.column)


def _write_shards(pairs: PairDataset, labelled: list[tuple[_ImageRecord, int]], folder: Path,
                  rows_per_shard: int) -> None:
    """Parquet shards of ``rows_per_shard`` rows, images as encoded bytes."""
    schema = pa.schema([("caption", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                        ("wins", pa.int64()), ("losses", pa.int64())])
    columns: dict[str, list] = {name: [] for name in schema.names}
    shard = 0

    def flush() -> None:
        nonlocal shard
        pq.write_table(pa.table(columns, schema=schema), folder / f"labelled-{shard:05d}.parquet")
        shard += 1
        for values in columns.values():
            values.clear()

    for record, label, cell in _rows(pairs, labelled):
        for name, value in zip(schema.names, (record.caption, read_image_bytes(cell, pairs.source.base),
                                              label, record.wins, record.losses)):
            columns[name].append(value)
        if len(columns["label"]) == rows_per_shard:
            flush()
    if columns["label"]:
        flush()


def _write_index(pairs: PairDataset, labelled: list[tuple[_ImageRecord, int]], folder: Path, out: Path) -> None:
    """An images.jsonl index whose image paths, relative to ``out``, point at the pairs' own files."""
    lines = []
    for record, label, cell in _rows(pairs, labelled):
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not isinstance(path, str):
            raise UserError(f"row {record.row}, column '{record.column}' of {pairs.source.path} holds no image "
                            "path; a .jsonl index of pairs must name image files")
        relative = os.path.relpath((pairs.source.base / path).resolve(), out.resolve())
        lines.append(json.dumps({"caption": record.caption, "image": relative, "label": label,
                                 "wins": record.wins, "losses": record.losses}))
    (folder / "images.jsonl").write_text("\n".join(lines) + "\n")
