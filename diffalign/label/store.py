"""The labels people give, kept as an append-only JSON-lines log: nothing given is ever lost.

Each label is one line, written with one ``write`` and flushed to the disk (``fsync``) before the page
hears that it was kept, so a server killed at any moment loses no label it acknowledged and never
leaves half a line behind. A torn last line (a power cut mid-write; no page was told it was kept) is
named, ignored, and cut off before the next label is written. A label is never
changed in place: a correction or an undo is a later line for the same item and labeller, and the last
one counts (``choice: null`` withdraws the label).

A line: ``{"item": "row-12", "choice": 0, "labeller": "ann", "time": "2026-12-03T18:00:00"}`` where
``choice`` is the index of the preferred image, ``"tie"``, ``"skip"`` (seen, left unlabelled), a list
(a ranking of K images, best first) or null; sources add their own keys (a D3PO round's ``round``,
``pair`` and ``winner``, which the training run reads).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from diffalign.errors import UserError

Choice = int | str | list | None


class LabelLog:
    """The log at ``path`` and what it says now: each (labeller, item)'s current choice."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.current: dict[tuple[str, str], Choice] = {}  # (labeller, item) -> its last choice
        self.order: list[tuple[str, str]] = []  # (labeller, item) of each label line, oldest first
        self.torn: str | None = None  # a last line cut short before this process started
        self._torn_at: int | None = None  # where it starts, in bytes: the next append cuts it off
        if self.path.is_file():
            data = self.path.read_bytes()
            lines = data.decode("utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    if number == len(lines) and not data.endswith(b"\n"):  # cut short by a crash mid-write
                        self.torn = f"{self.path}:{number}"
                        self._torn_at = data.rfind(b"\n") + 1
                        continue
                    raise ValueError(f"{self.path}:{number} is not a label line: {line[:120]!r}") from None

    def _apply(self, record: dict[str, Any]) -> None:
        key = (str(record["labeller"]), str(record["item"]))
        self.current[key] = record["choice"]
        self.order.append(key)

    def append(self, item: str, choice: Choice, labeller: str, **extra: Any) -> dict[str, Any]:
        """Write one label line and make it durable before returning it."""
        record = {"item": item, "choice": choice, "labeller": labeller, **extra,
                  "time": datetime.datetime.now().isoformat(timespec="seconds")}
        line = json.dumps(record) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._torn_at is not None:
                os.truncate(self.path, self._torn_at)
                self._torn_at = None
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._apply(record)
        return record

    def last_label_of(self, labeller: str) -> str | None:
        """The item of ``labeller``'s most recent label that still stands (what undo withdraws)."""
        with self._lock:
            for who, item in reversed(self.order):
                if who == labeller and self.current.get((who, item)) is not None:
                    return item
        return None

    def choices(self, labeller: str) -> dict[str, Choice]:
        """``labeller``'s current choice per item (withdrawn ones left out)."""
        with self._lock:
            return {item: c for (who, item), c in self.current.items() if who == labeller and c is not None}

    def labels(self) -> dict[str, dict[str, Choice]]:
        """Every item's current labels, by labeller (skips and withdrawn ones left out)."""
        by_item: dict[str, dict[str, Choice]] = defaultdict(dict)
        with self._lock:
            for (who, item), choice in self.current.items():
                if choice is not None and choice != "skip":
                    by_item[item][who] = choice
        return dict(by_item)

    def agreement(self) -> dict[str, float | int]:
        """Items labelled by two or more people, and the share of those on which all of them agree."""
        shared = [choices for choices in self.labels().values() if len(choices) > 1]
        agreeing = sum(len({json.dumps(c) for c in choices.values()}) == 1 for choices in shared)
        return {"items": len(shared), "agreeing": agreeing, "share": agreeing / len(shared) if shared else 0.0}


def round_pair_winners(path: str | Path) -> dict[tuple[int, int], int]:
    """The winner of each (round, pair) an online run's labels file gives (``online.labels``: lines with ``round``,
    ``pair`` and ``winner``, written by ``diffalign label RUN`` or by hand): a later line for a pair replaces an
    earlier one, and ``"winner": null`` withdraws the pair's label (an undo, a tie or a skip on the page). A file
    that does not exist yet holds none."""
    path = Path(path)
    labels: dict[tuple[int, int], int] = {}
    if not path.is_file():
        return labels
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (int(row["round"]), int(row["pair"]))
            if row["winner"] is None:
                labels.pop(key, None)
            else:
                labels[key] = int(row["winner"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}:{number} is not a label {{round, pair, winner}} ({err})") from None
    return labels
