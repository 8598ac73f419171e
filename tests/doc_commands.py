"""The pages whose commands and snippets the tests run: README.md, then every page of the docs site in the order
of its navigation (mkdocs.yml), so a later page finds what an earlier one made; and how a page's commands and
snippets are read from it. Shared by tests/test_readme.py and the tests that run one page's commands themselves."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _nav_files(nav) -> list[str]:
    files = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def doc_pages() -> list[Path]:
    """README.md and the docs pages, in the site's order; every page under docs/ must be in the navigation."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md", *(ROOT / "docs" / name for name in _nav_files(nav))]


def page_commands(text: str) -> list[str]:
    """The shell commands of a page: the lines of its bash blocks (continuations joined, comments dropped) and the
    ``diffalign``, ``python scripts/`` and ``accelerate launch`` commands quoted in its prose."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())  # a comment dropped, spaces folded
            if line:
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for quoted in re.findall(r"`((?:diffalign |python scripts/|accelerate launch )[^`]*)`", prose):
        commands.append(" ".join(quoted.split()))
    return commands


def page_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def all_commands() -> list[tuple[Path, str]]:
    """(page, command) of every page, in order."""
    return [(page, command) for page in doc_pages() for command in page_commands(page.read_text())]
