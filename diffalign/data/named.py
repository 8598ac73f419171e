"""Datasets named by a scheme instead of a path (``toy:pairs``): the data layer's registry of who makes them.

A scheme maps to the function that turns such a name into a local file, given as ``"module:function"`` and
imported only when a name of that scheme is read, as a package's entry points are: the data layer sits below
the toy world (which samples its datasets with a diffusion model), so it names the maker instead of importing
it. :func:`register_scheme` adds one (a plugin's own datasets, say).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

_SCHEMES: dict[str, str | Callable[[str], Path]] = {
    "toy": "diffalign.toy.datasets:toy_dataset",  # the toy worlds' datasets, sampled from the shipped models once
    "sign": "diffalign.synth.sign_pairs:sign_dataset",  # the sign world's OCR-ranked pairs, made the same way
}


def register_scheme(scheme: str, maker: str | Callable[[str], Path]) -> None:
    """Names ``scheme:NAME`` are resolved by ``maker(name)`` (a callable, or its ``"module:function"``)."""
    _SCHEMES[scheme] = maker


def named_scheme(source: str | Path) -> str | None:
    """The registered scheme ``source`` starts with (``toy`` for ``toy:pairs``), or None for a path."""
    scheme, colon, _ = str(source).partition(":")
    return scheme if colon and scheme in _SCHEMES else None


def resolve_named(source: str | Path) -> Path:
    """The local file a named dataset stands for, made by its scheme's maker if need be."""
    maker = _SCHEMES[named_scheme(source)]
    if isinstance(maker, str):
        module, function = maker.split(":")
        maker = getattr(importlib.import_module(module), function)
    return maker(str(source))
