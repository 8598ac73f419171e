"""Pairwise preference data in the Pick-a-Pic v2 layout, from local files.

Columns (names configurable): ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, or
paths relative to a .jsonl index) and ``label_0`` (1: first image preferred, 0: second,
0.5: tie; values in between are soft labels). Instead of the label, reward-model scores of
both images (one column pair per model) can give a smoothed preference
(:mod:`diffalign.data.smoothing`), which also decides which image comes first. Sources: a
parquet file or folder, a ``datasets`` folder saved with ``save_to_disk``, or a JSON-lines
index next to an image folder; tables are memory-mapped (see :class:`RowSource`). Captioned
images (one per row) may also be a plain folder of images with a caption file beside each.

Bad rows (undecodable image, missing caption, NaN label) are skipped and counted, or with
``on_error="raise"`` stop the run with the row index and column. Missing columns are an
error before training starts.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffalign.data.named import named_scheme, resolve_named
from diffalign.data.ensemble import preference_strength, softened_preference, vote_share
from diffalign.data.smoothing import smoothed_preference
from diffalign.data.video import VIDEO_SUFFIXES, TooFewFrames, VideoClips, clip_pixels, decode_clip, is_video_cell
from diffalign.errors import UserError
from diffalign.paths import find_locally, how_to_get

Tensor = torch.Tensor


class RowSource:
    """Random access to rows of a local table: ``len(source)``, ``source.row(i)``, ``source.column(name)``.

    A ``datasets`` folder (``save_to_disk``; of a ``DatasetDict``, its ``split``) is read as it is.
    A .jsonl index (or a folder holding one index and no parquet) is read as a list of dicts (it
    holds paths, not images). A folder holding neither tables nor an index but images is read as
    captioned images, the layout of kohya's and most LoRA trainers' datasets: one row per image
    file (any depth, sorted by path) with columns ``image`` (its path) and ``caption`` (the text of
    the ``.txt`` or ``.caption`` file of the same name beside it; missing if there is none).
    Parquet files and ``datasets`` folders are read through ``datasets`` as memory-mapped Arrow,
    so a table of images far larger than RAM costs almost no memory, shared by every process of
    the machine: parquet is converted once into the ``datasets`` cache
    (``HF_DATASETS_CACHE``), as ``load_dataset`` would, and reused by later runs. Image columns
    come as raw bytes: decoding is ours, so a corrupt image is a counted bad row, not a crash
    inside a reader.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        if named_scheme(path):  # toy:pairs and the like, made from the shipped toy model on first use
            path = resolve_named(path)
        found = find_locally(path, repo_type="dataset")
        if found is None:
            raise UserError(f"data.path {path} does not exist, and it names no dataset in the local Hugging Face "
                            f"cache. {how_to_get(path, repo_type='dataset')}.")
        self.path = found
        indexes = sorted(self.path.glob("*.jsonl")) if self.path.is_dir() else []
        if len(indexes) == 1 and not any(self.path.glob("*.parquet")):  # a folder holding one index
            self.path = indexes[0]
        self.base = self.path.parent if self.path.is_file() else self.path
        self._rows: list[dict] | None = None
        # lines of a .jsonl index that are no JSON object, as (line number, why): kept out of the rows, and
        # reported by the dataset as bad rows
        self.broken_lines: list[tuple[int, str]] = []
        if self.path.suffix == ".jsonl":
            self._rows = self._read_index()
            self.columns = sorted({k for r in self._rows for k in r})
            return
        import datasets

        if (self.path / "dataset_dict.json").exists():  # save_to_disk of a DatasetDict: one folder per split
            splits = datasets.load_from_disk(str(self.path))
            if split not in splits:
                raise UserError(f"data.path {self.path} has the splits {', '.join(splits)}, not {split!r}; "
                                "set data.split")
            dataset = splits[split]
        elif (self.path / "dataset_info.json").exists() or (self.path / "state.json").exists():
            dataset = datasets.load_from_disk(str(self.path))
        else:
            files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.parquet"))
            if not files:  # Hub-style split shards, else captioned images: one walk of the folder for both
                below = sorted(self.path.rglob("*"))
                files = _split_files(self.path, split, below)
                if not files:
                    self._rows = _captioned_image_files(self.path, below)
                    self.columns = ["caption", "image"]
                    return
            if sum(_parquet_rows(f) for f in files) == 0:
                raise UserError(f"data.path {self.path} holds no rows (its parquet file(s) are empty)")
            dataset = _parquet_as_arrow(files)
        self._dataset = dataset.with_format("arrow")  # raw cells: image bytes undecoded, rows as arrow slices
        self.columns = list(dataset.column_names)

    def _read_index(self) -> list[dict]:
        """The rows of a .jsonl index, one JSON object a line; a line that is none is noted in ``broken_lines``."""
        rows = []
        with self.path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    self.broken_lines.append((number, f"not valid JSON ({err.msg}, column {err.colno})"))
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    self.broken_lines.append((number, f"a JSON {type(row).__name__}, not an object of columns"))
        return rows

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._dataset)

    @property
    def holds_files(self) -> bool:
        """Whether rows name image files (a folder of images, a .jsonl index) rather than hold the images."""
        return self._rows is not None

    def row(self, i: int) -> dict[str, Any]:
        return self._rows[i] if self._rows is not None else self._dataset[i].to_pylist()[0]

    def column(self, name: str) -> list:
        if self._rows is not None:
            return [r.get(name) for r in self._rows]
        return self._dataset[name].to_pylist()

    def list_lengths(self, name: str) -> list[int]:
        """The length of each list cell of a column (0 where not a list), without reading the lists."""
        if self._rows is not None:
            return [len(v) if isinstance(v, (list, tuple)) else 0 for v in self.column(name)]
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self._dataset[name]
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            return [0] * len(column)
        return pc.fill_null(pc.list_value_length(column), 0).to_pylist()


def _parquet_as_arrow(files: list[Path]) -> Any:
    """The parquet files as one memory-mapped ``datasets.Dataset``, converted into the ``datasets``
    cache on first use (under a lock, so the processes of a multi-GPU run convert it once).

    The Arrow copy is about as large as the parquet (encoded images do not compress further):
    Pick-a-Pic v2's train split wants some 300 GB more. A disk without that much room is refused
    before the conversion starts, and one that fills up during it is reported the same way; in both
    cases ``datasets`` leaves no partial copy behind.
    """
    import datasets
    from datasets.io.parquet import ParquetDatasetReader

    reader = ParquetDatasetReader([str(f) for f in files])
    target = Path(reader.builder.cache_dir)
    needed = sum(f.stat().st_size for f in files)
    room = f"HF_DATASETS_CACHE (now {datasets.config.HF_DATASETS_CACHE}) to a folder on a disk with more room"
    if not (target / datasets.config.DATASET_INFO_FILENAME).is_file():
        free = shutil.disk_usage(next(p for p in (target, *target.parents) if p.exists())).free
        if free < needed:
            raise UserError(f"reading {len(files)} parquet file(s) ({needed / 1e9:.1f} GB) converts them once into "
                            f"memory-mapped Arrow at {target}, which needs at least as much free space; the disk "
                            f"has {free / 1e9:.1f} GB. Set {room}")
    try:
        return reader.read()
    except Exception as err:  # datasets wraps the writer's OSError in a DatasetGenerationError
        if not any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in (err, err.__cause__, err.__context__)):
            raise
        raise UserError(f"the disk filled up while converting {needed / 1e9:.1f} GB of parquet into Arrow at "
                        f"{target} (nothing was kept). Set {room}") from None


def _parquet_rows(file: Path) -> int:
    """The number of rows a parquet file holds, from its footer; a file that is no parquet is the reader's to name."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).metadata.num_rows
    except Exception:  # noqa: BLE001 - not parquet, or damaged: the conversion below says so in its own words
        return 1


def _split_files(folder: Path, split: str, below: list[Path]) -> list[Path]:
    """The parquet shards of one split among the sorted paths ``below`` a folder, named as the Hub names
    them: ``data/train-00000-of-00645-....parquet`` or ``train/0000.parquet``."""
    shards = [p for p in below if p.suffix == ".parquet"]
    chosen = [p for p in shards if p.name.startswith(f"{split}-") or p.parent.name == split]
    if shards and not chosen:
        names = sorted({p.parent.name if p.parent not in (folder, folder / "data") else p.name.split("-")[0]
                        for p in shards})
        raise UserError(f"data.path {folder} holds parquet shards, but none of split {split!r} (named "
                        f"{split}-*.parquet or in a {split}/ folder); set data.split to one of {', '.join(names)}")
    return chosen


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES  # the files a bad row is pointed at by
CAPTION_SUFFIXES = (".txt", ".caption")


def _captioned_image_files(folder: Path, below: list[Path]) -> list[dict[str, Any]]:
    """Rows ``{"image": relative path, "caption": text or None}`` of the images (or videos) among the sorted paths
    ``below`` a folder."""
    images = [p for p in below if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file()]
    if not images:
        raise UserError(f"data.path {folder} holds no .parquet files, datasets folder, .jsonl index, images "
                        f"({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)})")
    rows = []
    for image in images:
        sidecars = [image.with_suffix(suffix) for suffix in CAPTION_SUFFIXES]
        caption = next((p.read_text(encoding="utf-8").strip() for p in sidecars if p.is_file()), None)
        rows.append({"image": image.relative_to(folder).as_posix(), "caption": caption})
    return rows


class BadRow(Exception):
    """A row that cannot be used; carries the row index and the column at fault."""

    def __init__(self, index: int, column: str, reason: str) -> None:
        super().__init__(f"row {index}, column '{column}': {reason}")
        self.index, self.column, self.reason = index, column, reason


def read_image_bytes(value: Any, base: Path) -> bytes:
    """The encoded bytes of an image cell: bytes, a {"bytes": ...} struct or a relative path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = (base / value).read_bytes()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"expected image bytes or a path, got {type(value).__name__}")
    return bytes(value)


class TooManyPixels(ValueError):
    """An image larger than the pixel limit (a decompression bomb, or simply too large to train on)."""


# PIL's own threshold: above it PIL warns of a decompression bomb, above twice it refuses
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def load_image(value: Any, base: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, bytes]:
    """An RGB image and its raw bytes, from bytes, a {"bytes": ...} struct or a relative path.

    The size is read from the header before any pixel is decoded: an image of more than ``max_pixels`` pixels
    raises :class:`TooManyPixels` (a few KB of PNG can claim 20000 x 20000 pixels, 1.2 GB once decoded).
    """
    value = read_image_bytes(value, base)
    try:
        image = Image.open(io.BytesIO(value))
    except Image.DecompressionBombError as err:  # past PIL's own limit, which a larger max_pixels cannot lift
        raise TooManyPixels(str(err)) from None
    if image.width * image.height > max_pixels:
        raise TooManyPixels(f"{image.width}x{image.height} pixels, more than the limit of {max_pixels:,} "
                            "(data.max_image_pixels; a decompression bomb?)")
    image.load()
    return image.convert("RGB"), bytes(value)


def to_pixels(image: Image.Image, resolution: int, width: int | None = None) -> Tensor:
    """Resize to cover ``resolution`` x ``width`` (height x width; ``width`` None: a square of ``resolution``) keeping
    the aspect ratio, centre-crop that size, scale to [-1, 1]: (3, H, W)."""
    height, width = resolution, width or resolution
    w, h = image.size
    scale = max(height / h, width / w)
    image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - width) // 2, (h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool, not a string) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pair_label(value: Any, index: int, column: str) -> float | BadRow:
    """P(first image preferred) from a label cell: a number in [0, 1] (1 first wins, 0 second, 0.5 tie, between: soft),
    or a bool (true: first wins); a :class:`BadRow` for anything else (missing, NaN, text, 5, -1)."""
    if isinstance(value, bool):
        return float(value)
    if is_finite_number(value) and 0.0 <= value <= 1.0:
        return float(value)
    return BadRow(index, column, f"label must be a number in [0, 1] (1: first image preferred, 0: second, 0.5: tie), "
                                 f"got {value!r}")


def per_pair_number(value: Any, index: int, column: str, what: str, valid: Callable[[float], bool]) -> float | BadRow:
    """A pair's own number (its ``what``: weight or margin) from a table cell; a :class:`BadRow` where it is
    missing, not a finite number, or not ``valid``."""
    if is_finite_number(value) and valid(value):
        return float(value)
    return BadRow(index, column, f"{what} is missing, not a finite number, or invalid "
                                 f"({value!r}{'; weights are >= 0' if what == 'weight' else ''})")


@dataclass
class GroupExample:
    """K images of one prompt, best first, as the trainer consumes them (K = 2 for a pair)."""

    index: int
    caption: str
    pixels: Tensor | None  # (K, 3, R, R), preferred image first; None when read with decode=False
    image_ids: tuple[str, ...]  # content hashes of the images (cache keys)
    preference: float = 1.0  # P(first image preferred): 1.0, or 0.5 for a kept tie (pairs)
    scores: Tensor | None = None  # (K,) relevance scores, higher is better (ranked lists)
    weight: float = 1.0  # how many times the pair's loss counts (data.weight_column; pairs)
    margin: float | None = None  # the pair's target margin (data.margin_column, for dpo_margin; pairs)
    reward_gap: float | None = None  # a reward model's score of the winner minus the loser's (data.reward_columns)
    # an edit's source images, the same for every item of the group (data.source_columns): (S, 3, R, R), None when
    # read with decode=False or when the data has no source column
    sources: Tensor | None = None
    source_ids: tuple[str, ...] = ()  # content hashes of the source images (cache keys)


PRINTED_PER_COLUMN = 10  # bad rows of one column said one by one as they are met; the rest only counted
BROKEN_LINE = "(line)"  # the "column" of a .jsonl line that is no JSON object; its index is the line number


class ImageRows:
    """Shared by the datasets: a :class:`RowSource`, column checks, image decoding and the bad-row policy."""

    def __init__(self, path: str | Path, *, resolution: int, required: list[str], on_error: str,
                 split: str = "train", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 source_columns: Sequence[str] = (), video: VideoClips | None = None, width: int | None = None) -> None:
        """``source_columns``: the columns of an edit's source images (one or several), read with each row.
        ``video``: the items are videos, read as such clips ((3, F, H, W) pixels each); None for images. ``width``:
        items are cropped to ``resolution`` x ``width`` (height x width); None: squares of ``resolution``."""
        required = [*required, *source_columns]
        self.source_columns = tuple(source_columns)
        self.video = video
        self.source = RowSource(path, split)
        self.indices: Sequence[int] = range(len(self.source))  # the usable rows; a dataset narrows them down
        self.resolution, self.width = resolution, width
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels
        # each bad row once, by (row, column), with where to find it and why: a row met again in a later
        # epoch, or by the read-ahead threads, is the same bad row
        self.bad_rows: dict[tuple[int, str], str] = {}
        self._said = Counter()  # bad rows printed so far, per column (the first PRINTED_PER_COLUMN are)
        for number, reason in self.source.broken_lines:
            self.count_bad(BadRow(number, BROKEN_LINE, reason))
        if len(self.source) == 0:
            raise UserError(f"data.path {path} holds no rows" + (" (every line of the index is broken)"
                                                                  if self.source.broken_lines else ""))
        missing = [c for c in required if c not in self.source.columns]
        if missing:
            raise UserError(
                f"data.path {path} has no column {', '.join(repr(c) for c in missing)}; it has "
                f"{', '.join(self.source.columns)}. Rename the columns or set the data.*_column keys."
            )

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, position: int, decode: bool = True) -> GroupExample:
        """The group at ``position``; raises :class:`BadRow`. Pure (counts nothing), so threads may call it.

        ``decode=False`` reads and hashes the images without decoding them (pixels None): for
        images whose latents are cached, which were decoded successfully when they were cached.
        """
        raise NotImplementedError

    def example(self, position: int, decode: bool = True) -> GroupExample | None:
        """The group at ``position``; None for a bad row, counted (``on_error=skip``) or raised."""
        try:
            return self.read(position, decode)
        except BadRow as err:
            self.count_bad(err)
            return None

    @property
    def skipped(self) -> dict[str, int]:
        """Bad rows met so far, per column at fault."""
        return dict(Counter(column for _, column in self.bad_rows))

    def count_bad(self, err: BadRow) -> None:
        """Apply the bad-row policy: stop with a clear error, or record the row (once) and say so the first
        times (``PRINTED_PER_COLUMN`` per column; the rest are counted, not printed)."""
        if self.on_error == "raise":
            raise UserError(f"bad data: {self.where(err)}: {err.reason}. Fix or remove the row, or set "
                            "data.on_error=skip to skip such rows (they are counted and reported).")
        key = (err.index, err.column)
        if key in self.bad_rows:
            return
        self.bad_rows[key] = f"{self.where(err)}: {err.reason}"
        if self._said[err.column] < PRINTED_PER_COLUMN:
            self._said[err.column] += 1
            more = (f" (further bad rows of column '{err.column}' are counted, not printed)"
                    if self._said[err.column] == PRINTED_PER_COLUMN else "")
            print(f"skipped a bad row: {self.bad_rows[key]}{more}", file=sys.stderr, flush=True)

    def where(self, err: BadRow) -> str:
        """Where a person finds the bad row: the image file, for a folder of images or a .jsonl index of
        files; else the table's row and column."""
        if err.column == BROKEN_LINE:
            return f"{self.source.path}, line {err.index}"
        if self.source.holds_files:
            row = self.source.row(err.index)  # the cell's own file, or (a bad caption) its image's
            files = [v for v in (row.get(err.column), row.get("image"))
                     if isinstance(v, str) and v.lower().endswith(MEDIA_SUFFIXES)]
            if files:
                return f"{self.source.base / files[0]} (row {err.index}, column '{err.column}')"
        return f"{self.source.path}, row {err.index}, column '{err.column}'"

    def _caption(self, row: dict, index: int, column: str) -> str:
        caption = row.get(column)
        if not isinstance(caption, str) or not caption.strip():
            raise BadRow(index, column, "caption is missing or empty")
        return caption

    def _sources(self, row: dict, index: int, decode: bool) -> dict[str, Any]:
        """The row's source images (``source_columns``) as :class:`GroupExample` fields; none without them."""
        if not self.source_columns:
            return {}
        decoded = [self._decode(row.get(column), index, column, decode) for column in self.source_columns]
        return {"sources": torch.stack([p for p, _ in decoded]) if decode else None,
                "source_ids": tuple(i for _, i in decoded)}

    def _decode(self, value: Any, index: int, column: str, decode: bool = True) -> tuple[Tensor | None, str]:
        """(3, R, R) pixels and the content hash of one image cell; only the hash when not ``decode``. An item of
        video data (``video``; an edit's sources stay images) gives its clip's (3, F, R, R) pixels."""
        if self.video is not None and column not in self.source_columns:
            return self._decode_clip(value, index, column, decode)
        if is_video_cell(value):
            raise BadRow(index, column, "a video, and this run reads images: set data.frames to read each video as "
                                        "a clip of that many frames (a video model)")
        try:
            if not decode:
                raw = read_image_bytes(value, self.source.base)
                return None, hashlib.sha1(raw).hexdigest()
            image, raw = load_image(value, self.source.base, self.max_image_pixels)
        except TooManyPixels as err:
            raise BadRow(index, column, f"image too large: {err}") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise BadRow(index, column, f"image cannot be decoded ({err})") from None
        return to_pixels(image, self.resolution, self.width), hashlib.sha1(raw).hexdigest()

    def _decode_clip(self, value: Any, index: int, column: str, decode: bool) -> tuple[Tensor | None, str]:
        """A video cell's clip (``video``) and the hash of its bytes with the clip's settings."""
        try:
            raw = read_image_bytes(value, self.source.base)
            key = hashlib.sha1(raw + b"\0" + self.video.key).hexdigest()
            if not decode:
                return None, key
            frames = decode_clip(raw, self.video, self.max_image_pixels)
        except TooFewFrames as err:
            raise BadRow(index, column, f"video too short: {err}") from None
        except (OSError, ValueError) as err:
            raise BadRow(index, column, f"video cannot be decoded ({err})") from None
        return clip_pixels(frames, self.resolution, self.width), key


class PairDataset(ImageRows):
    """Usable pairs of a :class:`RowSource`, winner first; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        resolution: int,
        caption_column: str = "caption",
        image_columns: tuple[str, str] = ("jpg_0", "jpg_1"),
        label_column: str = "label_0",
        score_columns: list[tuple[str, str]] | None = None,
        score_scales: list[float] | None = None,
        ties: str = "drop",
        on_error: str = "skip",
        split: str = "train",
        weight_column: str | None = None,
        margin_column: str | None = None,
        ensemble_columns: list[tuple[str, str]] | None = None,
        ensemble: str = "none",
        reward_columns: tuple[str, str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        source_columns: Sequence[str] = (),
        video: VideoClips | None = None,
        width: int | None = None,
    ) -> None:
        labels_from = [c for pair in score_columns for c in pair] if score_columns else [label_column]
        per_pair = [c for c in (weight_column, margin_column) if c is not None]
        per_pair += [c for pair in ensemble_columns or () for c in pair] + list(reward_columns or ())
        if ensemble != "none" and not ensemble_columns:
            raise ValueError(f"ensemble={ensemble!r} judges the labels by reward models' scores: pass ensemble_columns")
        super().__init__(path, resolution=resolution, required=[caption_column, *image_columns, *labels_from, *per_pair],
                         on_error=on_error, split=split, max_image_pixels=max_image_pixels,
                         source_columns=source_columns, video=video, width=width)
        self.caption_column, self.image_columns = caption_column, tuple(image_columns)
        self.labels = self._labels(label_column, score_columns, score_scales)
        self.weights = self._per_pair(weight_column, "weight", lambda w: w >= 0)
        self.margins = self._per_pair(margin_column, "margin", lambda m: True)
        self.reward_gaps = self._reward_gaps(reward_columns)
        self.strengths, votes, softened = self._ensemble_verdicts(ensemble_columns or [])
        # ensemble=soften: each pair's preference for its labelled winner is the ensemble's (soft-label losses)
        self.softened = softened if ensemble == "soften" else None
        if ensemble == "weight":  # each decided pair's loss counts by the share of the models that back its label
            self.weights = [self._times_vote(w, v, label) for w, v, label in zip(self.weights, votes, self.labels)]
        self.disputed = 0  # pairs dropped because the reward ensemble backs the other image
        self.indices: list[int] = []
        for i, label in enumerate(self.labels):
            strength = self.strengths[i]
            bad = next((v for v in (label, self.weights[i], self.margins[i], self.reward_gaps[i], strength)
                        if isinstance(v, BadRow)), None)
            if bad is not None:
                self.count_bad(bad)
            elif label == 0.5 and ties == "drop":
                continue
            elif ensemble == "filter" and label != 0.5 and strength < 0:
                self.disputed += 1
            else:
                self.indices.append(i)
        if self.disputed:
            print(f"data.ensemble=filter: dropped {self.disputed} of {len(self.labels)} pairs whose labelled winner "
                  "the reward ensemble scores lower on average", file=sys.stderr, flush=True)
        if not self.indices:
            raise UserError(f"data.path {path} has no usable pair (all rows are ties, bad or disputed)")

    def _per_pair(self, column: str | None, what: str, valid) -> list[float | BadRow | None]:
        """Each row's number from ``column`` (a per-pair weight or margin); None for every row without a column,
        a :class:`BadRow` where it is missing, not finite or not ``valid``."""
        if column is None:
            return [None] * len(self.source)
        return [per_pair_number(v, i, column, what, valid) for i, v in enumerate(self.source.column(column))]

    def _reward_gaps(self, columns: tuple[str, str] | None) -> list[float | BadRow | None]:
        """Each row's reward gap, the labelled winner's score minus the loser's by the reward model of ``columns``
        (first, second); None for every row without them, a :class:`BadRow` where a score or the label is
        missing. A tie's gap is first minus second."""
        if not columns:
            return [None] * len(self.source)
        first, second = (self._per_pair(c, "reward score", lambda v: True) for c in columns)
        gaps: list[float | BadRow | None] = []
        for a, b, label in zip(first, second, self.labels):
            bad = next((v for v in (label, a, b) if isinstance(v, BadRow)), None)
            gaps.append(bad if bad is not None else (b - a if label < 0.5 else a - b))
        return gaps

    @staticmethod
    def _times_vote(weight: float | BadRow | None, vote: float | BadRow, label: float | BadRow) -> float | BadRow | None:
        """A pair's weight (its column's, or 1) times its vote share; a tie, which no model can back, and a bad
        row keep theirs."""
        if isinstance(weight, BadRow) or isinstance(vote, BadRow) or label == 0.5:
            return weight
        return (1.0 if weight is None else weight) * vote

    def _ensemble_verdicts(self, columns: list[tuple[str, str]]) -> tuple[list, list, list]:
        """Each row's mean preference strength for its labelled winner over the reward models of ``columns``, the
        share of them that back it, and their softened preference for it (:mod:`diffalign.data.ensemble`); None for
        every row without an ensemble, a :class:`BadRow` where a score or the label is missing."""
        if not columns:
            return [None] * len(self.source), [None] * len(self.source), [None] * len(self.source)
        bad, good, scores = self._model_scores(
            columns, "ensemble score is missing or not a finite number", is_finite_number,
            also_bad={i: label for i, label in enumerate(self.labels) if isinstance(label, BadRow)})
        first_wins = torch.tensor([self.labels[i] >= 0.5 for i in good], dtype=torch.bool)
        first, second = scores[..., 0], scores[..., 1]
        verdicts = ((preference_strength(first, second, first_wins)[0], vote_share(first, second, first_wins),
                     softened_preference(first, second, first_wins)) if good else (torch.zeros(0),) * 3)
        return tuple([bad[i] if i in bad else by_row[i] for i in range(len(self.source))]
                     for by_row in (dict(zip(good, v.tolist(), strict=True)) for v in verdicts))

    def _model_scores(self, columns: list[tuple[str, str]], reason: str, usable: Callable[[object], bool],
                      also_bad: dict[int, BadRow] | None = None) -> tuple[dict[int, BadRow], list[int], Tensor]:
        """Several reward models' scores of both images of every usable row: the rows where a score is not
        ``usable`` (a :class:`BadRow` giving ``reason`` and the first such column) or that ``also_bad`` names,
        the other rows, and their scores (rows, models, 2) in float64."""
        values = [(name, self.source.column(name)) for pair in columns for name in pair]
        bad = {i: BadRow(i, name, reason) for name, column in reversed(values) for i, v in enumerate(column)
               if not usable(v)}
        bad.update(also_bad or {})
        good = [i for i in range(len(self.source)) if i not in bad]
        scores = torch.tensor([[float(column[i]) for _, column in values] for i in good], dtype=torch.float64)
        return bad, good, scores.view(len(good), len(columns), 2)

    def _labels(self, label_column: str, score_columns: list[tuple[str, str]] | None,
                 score_scales: list[float] | None) -> list[float | BadRow]:
        """P(first image preferred) of every row, from the label or smoothed from the scores; a :class:`BadRow` where
        the label is missing, not a number or outside [0, 1], or a score is missing or not a finite number."""
        if not score_columns:
            return [pair_label(v, i, label_column) for i, v in enumerate(self.source.column(label_column))]
        bad, good, scores = self._model_scores(score_columns, "score is missing or not a finite number", is_finite_number)
        scales = None if not score_scales else torch.tensor(score_scales, dtype=torch.float64)
        p = smoothed_preference(scores[..., 0], scores[..., 1], scales).tolist() if good else []
        smoothed = dict(zip(good, p, strict=True))
        return [bad[i] if i in bad else smoothed[i] for i in range(len(self.source))]

    def ease(self) -> list[float]:
        """Each usable pair's ease for Curry-DPO's order (``data.curriculum=score_gap``): the strength |p - 1/2| of
        its smoothed preference from ``data.score_columns``."""
        return [abs(self.labels[i] - 0.5) for i in self.indices]

    def read(self, position: int, decode: bool = True) -> GroupExample:
        """The pair at ``position`` of the usable pairs, winner first; raises :class:`BadRow`."""
        index = self.indices[position]
        row = self.source.row(index)
        caption = self._caption(row, index, self.caption_column)
        decoded = [self._decode(row.get(column), index, column, decode) for column in self.image_columns]
        label = self.labels[index]
        if label < 0.5:  # the second image won: put it first
            decoded.reverse()
        pixels = torch.stack([p for p, _ in decoded]) if decode else None
        weight, margin = self.weights[index], self.margins[index]
        preference = max(label, 1 - label) if self.softened is None else self.softened[index]
        return GroupExample(index, caption, pixels, tuple(i for _, i in decoded), preference=preference,
                            weight=1.0 if weight is None else weight, margin=margin,
                            reward_gap=self.reward_gaps[index], **self._sources(row, index, decode))
