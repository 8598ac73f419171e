"""Names of the models an evaluation compares, from ``--aligned [NAME=]SOURCE`` arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from diffalign.errors import UserError


GENERIC = ("run", "final")  # folder names that say nothing of which run it is


def model_names(items: Sequence[str], taken: Sequence[str] = ("base",)) -> dict[str, str]:
    """``{name: source}`` for ``[NAME=]SOURCE`` items, every name distinct.

    A source without a name is named by the end of its path, as long as it takes to tell it from the
    others: ``runs/demo-1/run`` and ``runs/demo-2/run`` become ``demo-1/run`` and ``demo-2/run``, not two
    models called ``run`` of which the report would keep one; a folder called ``run`` or ``final`` is named
    with its parent's name even when it is the only one. A name given twice, or a name in ``taken``
    (the base's row), is refused with the fix.
    """
    given = [item.rpartition("=") for item in items]
    named = [name for name, _, _ in given if name]
    for item, (name, _, _) in zip(items, given):
        if "=" in name or "," in name:  # "a=X,b=Y" read as one model named "a=X,b" at Y
            raise UserError(f"--aligned {item!r} names more than one model in one item; give each its own item, "
                            "separated by spaces: --aligned NAME1=SOURCE1 NAME2=SOURCE2")
    for name in named:
        if named.count(name) > 1 or name in taken:
            raise UserError(f"--aligned names two models {name!r} (or the base's row); give each a name of its own, "
                            f"e.g. --aligned {name}1=SOURCE {name}2=SOURCE")
    unnamed = [Path(source) for name, _, source in given if not name]
    # a folder named only "run" or "final" (the demo's runs/demo-<time>/run) is named with its parent's name too
    depth = 2 if any(p.name in GENERIC and len(p.parts) > 1 for p in unnamed) else 1
    while depth < max((len(p.parts) for p in unnamed), default=1):
        endings = [_ending(p, depth) for p in unnamed]
        if len(set(endings)) == len(endings) and not set(endings) & {*named, *taken}:
            break
        depth += 1
    names: dict[str, str] = {}
    for name, _, source in given:
        name = name or _ending(Path(source), depth)
        if name in names or name in taken:
            raise UserError(f"--aligned {source} cannot be told from another model by its path; name it: "
                            f"--aligned NAME={source}")
        names[name] = source
    return names


def _ending(path: Path, depth: int) -> str:
    """The last ``depth`` parts of ``path``, as a name."""
    return "/".join(path.parts[-depth:])
