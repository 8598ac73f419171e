"""Prompt sets for evaluation and synthetic data, from the files benchmarks publish them in.

- ``.txt``: one prompt per line, ``#`` comments.
- ``.jsonl``: one ``{"prompt": ...}`` (or ``caption``/``text``) object or string per line.
- ``.json``: a list of prompts (strings or such objects), as the HPSv2 benchmark ships them.
- ``.tsv``/``.csv`` with a header: the ``Prompt`` column (any case; or ``caption``/``text``), as
  PartiPrompts' ``PartiPrompts.tsv``.
- a table diffalign reads as training data (parquet file or folder, ``datasets`` folder, or the Hub id of
  a dataset in the local Hugging Face cache) with ``:split`` after it:
  ``yuvalkirstain/pickapic_v2:validation_unique``. Its caption column gives the prompts, each once
  (a pairs table repeats a caption in every pair).
- a bare name such as ``toy_heldout``: a set shipped in ``assets/prompts/`` (``geneval``: GenEval's 553 prompts,
  each line with the metadata the geneval reward judges it by).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from diffalign.errors import UserError
from diffalign.paths import PROMPTS, find_locally

PROMPT_FIELDS = ("prompt", "prompts", "caption", "text")  # the field holding the prompt, in order of preference
# (DrawBench's sheet calls its column Prompts)


def _prompt_of(value: object, where: str) -> str:
    """A prompt from a string or from an object's prompt field."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for name in PROMPT_FIELDS:
            if isinstance(value.get(name), str):
                return value[name]
    raise UserError(f"{where} has no prompt: expected a string or an object with a {'/'.join(PROMPT_FIELDS)} field")


def _prompt_field(names: list[str], where: str) -> str:
    """The name among ``names`` that holds prompts (case-insensitive)."""
    by_lower = {name.lower(): name for name in names}
    for wanted in PROMPT_FIELDS:
        if wanted in by_lower:
            return by_lower[wanted]
    raise UserError(f"{where} has no {'/'.join(PROMPT_FIELDS)} column; it has {', '.join(names)}")


def _from_jsonl(path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(_prompt_of(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return prompts


def _from_json(path: Path) -> list[str]:
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(values, list):
        raise UserError(f"{path} must hold a JSON list of prompts")
    return [_prompt_of(value, f"{path}, item {i}") for i, value in enumerate(values)]


def _from_delimited(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        column = _prompt_field(list(rows.fieldnames or []), str(path))
        return [row[column] for row in rows if (row[column] or "").strip()]


def _from_table(source: str, split: str) -> list[str]:
    from diffalign.data import RowSource

    table = RowSource(source, split)
    column = _prompt_field(table.columns, f"{source} (split {split})")
    return list(dict.fromkeys(p for p in table.column(column) if isinstance(p, str) and p.strip()))


def _from_text(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


SHIPPED_SUFFIXES = (".txt", ".jsonl")  # the shipped sets' files: plain prompts, or prompts with their metadata
READERS = {".jsonl": _from_jsonl, ".json": _from_json, ".tsv": _from_delimited, ".csv": _from_delimited}


def prompt_path(source: str | Path) -> Path:
    """The file ``source`` names: itself, or for a bare name that is no file here, the shipped set of that name."""
    path = Path(source)
    if not path.exists() and not path.suffix:
        path = next((PROMPTS / f"{source}{suffix}" for suffix in SHIPPED_SUFFIXES
                     if (PROMPTS / f"{source}{suffix}").is_file()), path)
    return path


def read_prompts(source: str | Path) -> list[str]:
    """The prompts of ``source`` (see the module docstring), in their order. Other files are read as text."""
    text = str(source)
    path = prompt_path(text)
    if path.is_file() and path.suffix != ".parquet":
        prompts = READERS.get(path.suffix, _from_text)(path)
    else:
        table, split = (text, "train") if path.exists() or ":" not in text else text.rsplit(":", 1)
        if find_locally(table, repo_type="dataset") is None:
            shipped = ", ".join(sorted(p.stem for suffix in SHIPPED_SUFFIXES for p in PROMPTS.glob(f"*{suffix}")))
            raise UserError(f"prompt source {source} does not exist: give a prompt file (.txt, .jsonl, .json, .tsv, "
                            f".csv), a table (with :split), a dataset in the local Hugging Face cache, or a shipped "
                            f"set ({shipped})")
        prompts = _from_table(table, split)
    if not prompts:
        raise UserError(f"{source} holds no prompts")
    return prompts
