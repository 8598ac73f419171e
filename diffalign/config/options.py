"""A method's own settings: one small dataclass per objective, set under ``objective.options`` in YAML and on the
command line (``objective.options.kl_coef=0.04``).

Each field's comment above it is its documentation (``diffalign methods NAME`` prints it), its default is the
method's, and :func:`ranged` attaches the allowed interval (and, for words, the choices), so a method's checks
live in its own file. :func:`build_options` turns the raw mapping into the dataclass: unknown names get "did you
mean", naming the method; types, finiteness and ranges are checked with the rest of the config, before any model
loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from diffalign.config.bounds import in_range, interval, parse_interval
from diffalign.config.schema import _build
from diffalign.errors import UserError


@dataclass
class NoOptions:
    """The options of a method that has none of its own."""


def ranged(default: Any, allowed: str | tuple[str, ...]) -> Any:
    """A dataclass field with its default and what it allows: an interval such as ``"(0, 1)"`` or ``"[1, inf)"``
    for a number, a tuple of words for a string."""
    return field(default=default, metadata={"allowed": allowed})


def build_options(cls: type, values: Any, method: str) -> Any:
    """``values`` (a mapping from the config, or an instance already) as ``cls``, checked; see the module docstring."""
    if isinstance(values, cls):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise UserError(f"objective.options must be a mapping of {method}'s options, got {values!r:.60}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listed = ", ".join(known) if known else "none"
            raise UserError(f"objective.options.{key}: {method} has no option {key!r}{hint}. Its options: {listed} "
                            f"(`diffalign methods {method}` describes them)")
    options = _build(cls, values, "objective.options.")
    for f in dataclasses.fields(cls):
        allowed, value = f.metadata.get("allowed"), getattr(options, f.name)
        if allowed is None or value is None:
            continue
        if isinstance(allowed, tuple):
            if value not in allowed:
                raise UserError(f"objective.options.{f.name}={value!r} is not valid for {method}; choose one of "
                                f"{', '.join(allowed)}")
        elif not in_range(value, *parse_interval(allowed)):
            raise UserError(f"objective.options.{f.name}={value!r} is out of range for {method}: it must be in "
                            f"{interval(*parse_interval(allowed))}")
    return options


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment lines right above it in its class's source. A run of fields under
    one comment (no blank line between) shares it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()[1:]
        except (OSError, TypeError):
            continue
        comment: list[str] = []
        shared = ""
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                comment.append(stripped.lstrip("#").strip())
            elif match := re.match(r"(\w+)\s*:\s*\S", stripped):
                if comment:
                    shared, comment = " ".join(comment), []
                docs[match[1]] = shared
            else:
                comment, shared = [], ""
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def describe(cls: type) -> list[tuple[str, str, Any, str, str]]:
    """(name, type, default, allowed, documentation) of each option of ``cls``, for ``diffalign methods NAME``."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f.metadata.get("allowed", "")
        allowed = ", ".join(allowed) if isinstance(allowed, tuple) else allowed
        rows.append((f.name, str(f.type), default, allowed, docs[f.name]))
    return rows
