"""What a person labels, read with diffalign's own data readers, and what their labels become.

- :class:`PairsSource`: a pairs dataset (Pick-a-Pic layout: ``caption``, ``jpg_0``, ``jpg_1``; parquet,
  a ``datasets`` folder, or a .jsonl index such as generate-ranked's ``pairs.jsonl``). The labels become
  ``OUT/pairs.jsonl``, a pairs dataset the trainer reads (``label_0`` 1, 0, or 0.5 for a tie), with each
  labelled image copied to ``OUT/images/``.
- :class:`RankedSource`: ranked lists (generate-ranked's output folder: ``caption``, ``images``,
  ``scores``). A person ranks each list by picking the best image, then the best of the rest, and so on;
  the labels become ``OUT/ranked.jsonl``, a ranked-list dataset for rank_dpo.
- :class:`D3poRoundSource`: a D3PO run stopped for human labels (its round's ``to_label.jsonl``). The log
  *is* the run's ``online.labels`` file: each line carries ``round``, ``pair`` and ``winner``, which
  ``train.resume=latest`` reads.

Edits: a table's source-image columns (``sources``, as a run's ``data.source_columns``), or an edit round's
``sources``, are shown beside the candidates, and a labelled table keeps them (copied beside its images), so the
dataset trains edits as it came.

Each output dataset is written again from the log after every label, beside its place and renamed into
it, so it is always whole; the log stays the record (several labellers' rows, each with its name).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from diffalign.data.pairs import RowSource, read_image_bytes
from diffalign.data.video import is_video_cell, video_suffix
from diffalign.errors import UserError
from diffalign.label.store import Choice, LabelLog

JPEG_MAGIC = b"\xff\xd8\xff"  # a copied image keeps its encoding, and a name that says it
PAGE_PX = 768  # the longer side of an image as the page gets it; smaller images are sent as they are


@dataclass
class Item:
    """One thing to label: a prompt and its K images (reward scores per image, shown only on demand)."""

    id: str
    prompt: str
    images: int
    scores: dict[str, list[float]] = field(default_factory=dict)
    sources: int = 0  # the edit's source images, shown beside the candidates
    videos: bool = False  # its candidates are videos (a video model's clips), played in a loop


def page_image(raw: bytes) -> tuple[bytes, str]:
    """An image as the page shows it: at most ``PAGE_PX`` on its longer side (JPEG), else unchanged (PNG). An animated
    image (a round's clip as WebP, a GIF) is sent as it is, which the page's image plays; a video is sent as VP9 WebM
    at most ``PAGE_PX`` on its longer side, which every browser's video element plays (:func:`page_video`)."""
    if video_suffix(raw) is not None:
        return page_video(raw), "video/webm"
    with Image.open(io.BytesIO(raw)) as image:
        if getattr(image, "n_frames", 1) > 1:
            return raw, f"image/{image.format.lower()}"
        image = image.convert("RGB")
        buffer = io.BytesIO()
        if max(image.size) > PAGE_PX:
            image.thumbnail((PAGE_PX, PAGE_PX), Image.LANCZOS)
            image.save(buffer, format="JPEG", quality=90)
            return buffer.getvalue(), "image/jpeg"
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"


PAGE_FRAMES = 241  # the most frames of a video the page plays (10 s at 24 fps)


def page_video(raw: bytes) -> bytes:
    """A video's first ``PAGE_FRAMES`` frames, shrunk to at most ``PAGE_PX`` on the longer side, as VP9 WebM at its own
    frame rate: what the page plays, whatever codec the file holds (Chromium plays no MPEG-4 part 2, say)."""
    import av
    import numpy as np
    import torch

    from diffalign.eval.report import clip_webm

    frames, fps = [], 16.0
    with av.open(io.BytesIO(raw)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or fps)
        for frame in container.decode(stream):
            image = frame.to_image()
            image.thumbnail((PAGE_PX, PAGE_PX), Image.LANCZOS)
            frames.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255))
            if len(frames) == PAGE_FRAMES:
                break
    if not frames:
        raise ValueError("the video holds no frame")
    return clip_webm(torch.stack(frames).permute(3, 0, 1, 2), fps)


def _write_atomically(path: Path, rows: list[dict[str, Any]]) -> Path:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)
    return path


class Source:
    """The interface the server uses; see the module docstring for the three kinds."""

    kind = ""
    allows_tie = True
    log_path: Path
    dataset_path: Path | None = None  # what the labels become for the trainer (None: the log itself)

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, index: int) -> Item:
        raise NotImplementedError

    def item_id(self, index: int) -> str:
        """Item ``index``'s id, without reading its row."""
        return self.item(index).id

    def index_of(self, item_id: str) -> int:
        return next(i for i in range(len(self)) if self.item_id(i) == item_id)

    def image(self, index: int, k: int) -> bytes:
        raise NotImplementedError

    def source_image(self, index: int, s: int) -> bytes:
        """Item ``index``'s source image ``s`` (an edit's)."""
        raise NotImplementedError

    def check(self, index: int, choice: Choice) -> None:
        """Raise ValueError unless ``choice`` is a label this item can take."""
        n = self.item(index).images
        if choice in ("skip", None) or (choice == "tie" and self.allows_tie):
            return
        if n == 2 and choice in (0, 1) and not isinstance(choice, bool):
            return
        if n > 2 and isinstance(choice, list) and sorted(choice) == list(range(n)):
            return
        wanted = "0 or 1" if n == 2 else f"a ranking of the {n} images (a list of 0-{n - 1}, best first)"
        raise ValueError(f"choice must be {wanted}{', tie' if self.allows_tie else ''}, skip or null; "
                         f"got {choice!r}")

    def extra(self, index: int, choice: Choice) -> dict[str, Any]:
        """Keys of the source's own on the log line (a D3PO round's)."""
        return {}

    def write(self, log: LabelLog) -> Path | None:
        """Write the dataset the labels make (after each label); returns its path."""
        return None


class _TableSource(Source):
    """Shared by pairs and ranked lists: rows of a :class:`RowSource`, labelled into ``out``."""

    def __init__(self, path: str | Path, out: str | Path | None, columns: list[str], sources: list[str]) -> None:
        self.rows = RowSource(path)
        self.sources = list(sources)
        missing = [c for c in [*columns, *self.sources] if c not in self.rows.columns]
        if missing:
            raise UserError(f"{path} has no column {', '.join(missing)} (it has {', '.join(self.rows.columns)})")
        source = Path(path)
        self.out = Path(out) if out else source.with_name(f"{source.stem}-labelled")
        self.log_path = self.out / "labels.jsonl"
        self._copied: dict[int, tuple[str, list[str], dict[str, str]]] = {}  # row -> caption, images, sources in out

    def __len__(self) -> int:
        return len(self.rows)

    def item_id(self, index: int) -> str:
        return f"row-{index}"

    def index_of(self, item_id: str) -> int:
        return int(item_id.removeprefix("row-"))

    def _image_cells(self, row: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def _videos(cells: list[Any]) -> bool:
        """Whether a row's candidates are videos (by their files' suffixes or their bytes' signatures)."""
        return any(is_video_cell(cell) for cell in cells)

    def _dataset_row(self, caption: str, images: list[str], choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def source_image(self, index: int, s: int) -> bytes:
        return read_image_bytes(self.rows.row(index)[self.sources[s]], self.rows.base)

    def _copy(self, cell: Any, name: str) -> str:
        """An image (or video) cell written to ``out/images/NAME`` (its encoding's suffix), once; its path relative to
        out."""
        raw = read_image_bytes(cell, self.rows.base)
        relative = f"images/{name}{video_suffix(raw) or ('.jpg' if raw.startswith(JPEG_MAGIC) else '.png')}"
        target = self.out / relative
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw)
        return relative

    def _copied_row(self, index: int) -> tuple[str, list[str], dict[str, str]]:
        """Row ``index``'s caption, its images and its sources copied into ``out/images/``, as paths relative to
        ``out``; the row is read and its images written once, so rewriting the dataset after each label stays
        cheap."""
        if index not in self._copied:
            row = self.rows.row(index)
            images = [self._copy(cell, f"row-{index:07d}-{k}") for k, cell in enumerate(self._image_cells(row))]
            sources = {column: self._copy(row[column], f"row-{index:07d}-{column}") for column in self.sources}
            self._copied[index] = (str(row["caption"]), images, sources)
        return self._copied[index]

    def write(self, log: LabelLog) -> Path:
        """The dataset of every current label, one row per item and labeller, in the source's order."""
        rows = []
        for item, by_labeller in sorted(log.labels().items(), key=lambda kv: self.index_of(kv[0])):
            index = self.index_of(item)
            caption, images, sources = self._copied_row(index)
            for labeller, choice in sorted(by_labeller.items()):
                rows.append({**self._dataset_row(caption, images, choice), **sources, "labeller": labeller,
                             "source_row": index})
        return _write_atomically(self.dataset_path, rows)


class PairsSource(_TableSource):
    kind = "pairs"

    def __init__(self, path: str | Path, out: str | Path | None = None, sources: list[str] = ()) -> None:
        super().__init__(path, out, ["caption", "jpg_0", "jpg_1"], sources)
        self.dataset_path = self.out / "pairs.jsonl"
        # reward scores of both images (generate-ranked writes <reward>_0 / <reward>_1), shown on demand
        self.score_names = [c[:-2] for c in self.rows.columns
                            if c.endswith("_0") and f"{c[:-2]}_1" in self.rows.columns and c[:-2] not in ("jpg", "label")]

    def item(self, index: int) -> Item:
        row = self.rows.row(index)
        scores = {name: [row.get(f"{name}_0"), row.get(f"{name}_1")] for name in self.score_names}
        return Item(f"row-{index}", str(row.get("caption") or ""), 2,
                    {name: [float(v) for v in values] for name, values in scores.items()
                     if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)}, len(self.sources),
                    videos=self._videos(self._image_cells(row)))

    def image(self, index: int, k: int) -> bytes:
        return read_image_bytes(self.rows.row(index)[f"jpg_{k}"], self.rows.base)

    def _image_cells(self, row: dict[str, Any]) -> list[Any]:
        return [row["jpg_0"], row["jpg_1"]]

    def _dataset_row(self, caption: str, images: list[str], choice: Choice) -> dict[str, Any]:
        label = 0.5 if choice == "tie" else 1.0 - float(choice)  # P(first image preferred)
        return {"caption": caption, "jpg_0": images[0], "jpg_1": images[1], "label_0": label}


class RankedSource(_TableSource):
    kind = "ranked"
    allows_tie = False  # a list whose images are all equal teaches nothing: skip it instead

    def __init__(self, path: str | Path, out: str | Path | None = None, sources: list[str] = ()) -> None:
        super().__init__(path, out, ["caption", "images"], sources)
        self.dataset_path = self.out / "ranked.jsonl"

    def item(self, index: int) -> Item:
        row = self.rows.row(index)
        scores = row.get("scores")
        shown = {"scores": [float(s) for s in scores]} if isinstance(scores, list) else {}
        return Item(f"row-{index}", str(row.get("caption") or ""), len(row["images"]), shown, len(self.sources),
                    videos=self._videos(self._image_cells(row)))

    def image(self, index: int, k: int) -> bytes:
        return read_image_bytes(self.rows.row(index)["images"][k], self.rows.base)

    def _image_cells(self, row: dict[str, Any]) -> list[Any]:
        return list(row["images"])

    def _dataset_row(self, caption: str, images: list[str], choice: Choice) -> dict[str, Any]:
        scores = [0.0] * len(choice)
        for place, k in enumerate(choice):  # a ranking, best first: the best scores K - 1, the worst 0
            scores[k] = float(len(choice) - 1 - place)
        return {"caption": caption, "images": images, "scores": scores}


class D3poRoundSource(Source):
    kind = "d3po"
    allows_tie = False  # D3PO trains on a winner per pair: a tie or a skip leaves the pair to label

    def __init__(self, run: str | Path, out: str | Path | None = None) -> None:
        run = Path(run)
        waiting = sorted(run.glob("rounds/round-*/to_label.jsonl"))
        if not waiting:
            raise UserError(f"{run} has no round waiting for labels (no rounds/round-*/to_label.jsonl); a D3PO run "
                            "with online.labels set writes one when it stops for labels")
        self.folder = waiting[-1].parent
        self.pairs = [json.loads(line) for line in waiting[-1].read_text().splitlines() if line.strip()]
        labels = yaml.safe_load((run / "config.yaml").read_text()).get("online", {}).get("labels")
        if out is None and not labels:
            raise UserError(f"{run}'s config names no online.labels file; give one with --out")
        # the file the run reads its labels from (relative to where it was started, as the run reads it)
        self.log_path = Path(out or labels)

    def __len__(self) -> int:
        return len(self.pairs)

    def item(self, index: int) -> Item:
        pair = self.pairs[index]
        return Item(self.item_id(index), pair["prompt"], len(pair["images"]), sources=len(pair.get("sources", [])))

    def item_id(self, index: int) -> str:
        pair = self.pairs[index]
        return f"round-{pair['round']}-pair-{pair['pair']}"

    def image(self, index: int, k: int) -> bytes:
        return (self.folder / self.pairs[index]["images"][k]).read_bytes()

    def source_image(self, index: int, s: int) -> bytes:
        return (self.folder / self.pairs[index]["sources"][s]).read_bytes()

    def extra(self, index: int, choice: Choice) -> dict[str, Any]:
        pair = self.pairs[index]
        return {"round": pair["round"], "pair": pair["pair"], "winner": choice if choice in (0, 1) else None}


def open_source(source: str | Path, out: str | Path | None = None, sources: list[str] = ()) -> Source:
    """The source ``source`` names: a D3PO run waiting for labels (an edit round shows its sources itself), ranked
    lists, or pairs, each with its edits' source-image columns ``sources``."""
    path = Path(source)
    if path.is_dir() and (path / "rounds").is_dir() and (path / "config.yaml").is_file():
        if sources:
            raise UserError("a D3PO round names its own source images (an edit round's to_label.jsonl); "
                            "drop --sources")
        return D3poRoundSource(path, out)
    columns = RowSource(path).columns
    if "images" in columns:
        return RankedSource(path, out, list(sources))
    if {"jpg_0", "jpg_1"} <= set(columns):
        return PairsSource(path, out, list(sources))
    raise UserError(f"{source} is neither a D3PO run waiting for labels, ranked lists (caption, images) nor pairs "
                    f"(caption, jpg_0, jpg_1); it has the columns {', '.join(columns)}")


__all__ = ["D3poRoundSource", "Item", "PairsSource", "RankedSource", "Source", "open_source", "page_image"]
