"""Write the generated reference pages of the docs: every config key (docs/reference/config.md) and every command
(docs/reference/cli.md), from the config dataclasses, the methods' option dataclasses and the argument parser.

    python scripts/gen_reference.py          # write them
    python scripts/gen_reference.py --check  # exit 1 if a page is not what the code says (the test suite runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from diffalign.cli import build_parser
from diffalign.config import Config, describe, field_docs
from diffalign.config.bounds import BOUNDS, interval
from diffalign.objectives import OBJECTIVES

os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: the pages must not depend on it
DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_reference() -> str:
    lines = ["# Config reference", "",
             "Every key of a run config (in its YAML file, or `key=value` after the config file on the command line), generated from "
             "`diffalign/config/schema.py` by `scripts/gen_reference.py`: its type, default, allowed range where "
             "one applies, and what it does. A method's own settings (`objective.options.*`) follow, per method.", ""]
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(section.default_factory if section.default_factory is not dataclasses.MISSING
                                        else None):
            continue
        cls = section.default_factory
        docs = field_docs(cls)
        lines += [f"## {section.name}", "", "| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            dotted = f"{section.name}.{f.name}"
            allowed = interval(*BOUNDS[dotted]) if dotted in BOUNDS else ""
            lines.append(f"| `{dotted}` | `{_cell(f.type)}` | `{_cell(repr(_default(f)))}` | {allowed} | "
                         f"{_cell(docs[f.name])} |")
        lines.append("")
    docs = field_docs(Config)
    lines += ["## output_dir", "", f"`output_dir` (default `{Config().output_dir}`): {docs['output_dir']}", "",
              "## objective.options, per method", "",
              "Set as `objective.options.KEY=VALUE`; diffalign methods NAME prints the same.", ""]
    for name, cls in sorted(OBJECTIVES.items()):
        options = describe(cls.Options)
        if not options:
            continue
        lines += [f"### {name}", "", "| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for key, kind, default, allowed, doc in options:
            lines.append(f"| `objective.options.{key}` | `{_cell(kind)}` | `{_cell(repr(default))}` | {_cell(allowed)} | "
                         f"{_cell(doc)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def cli_reference() -> str:
    parser = build_parser()
    lines = ["# CLI reference", "", "Every command's `--help`, generated from the argument parser by "
             "`scripts/gen_reference.py`.", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    for name, command in sub.choices.items():
        lines += [f"## diffalign {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs from what the code says")
    args = parser.parse_args()
    stale = []
    for name, text in (("config.md", config_reference()), ("cli.md", cli_reference())):
        path = DOCS / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/gen_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
