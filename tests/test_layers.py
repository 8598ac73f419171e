"""The package's layers import downwards only: no two top-level packages of ``diffalign`` import each other,
directly or through others, counting imports inside functions too (a lazy import is still a dependency). Only the
command line (``cli``, ``__main__``) may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffalign"
TOP = ("cli", "__main__")


def _imports() -> dict[str, dict[str, str]]:
    """For each top-level part of diffalign, the parts it imports and one file that does."""
    graph: dict[str, dict[str, str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts  # ("diffalign", "train", "config")
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        top = parts[1]
        graph.setdefault(top, {})
        if top in TOP:
            continue
        package = parts[:-1] if file.name != "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                names = [".".join([*base, node.module] if node.module else base) if node.level else node.module or ""]
            else:
                continue
            for name in names:
                target = name.split(".")
                if target[0] == "diffalign" and len(target) > 1 and target[1] != top:
                    graph[top].setdefault(target[1], str(file.relative_to(PACKAGE.parent)))
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_top_level_packages_import_each_other():
    graph = _imports()
    cycles = _cycles(graph)
    described = ["; ".join(f"{a} -> {b} ({graph[a][b]})" for a in cycle for b in graph[a] if b in cycle)
                 for cycle in cycles]
    assert not cycles, "import cycles between diffalign's packages: " + " | ".join(described)


def test_the_cycle_check_sees_a_cycle_and_imports_inside_functions():
    assert _cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == [["a", "b", "c"]]
    graph = _imports()
    assert "trained_weights" in graph["diffusion"]  # finetuned.py imports it inside a function
    assert "objectives" not in graph["config"] and "train" not in graph["objectives"]
