"""The package's imports point one way: no module circle, no package circle, no private import from outside.

Read from the source with :mod:`ast` (nothing is imported). An edge is every
runtime import, including the ones inside function bodies; imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sensisearch"
STUDY_LAYERS = ("config", "store", "trial", "search", "run", "review")
"""The study's subpackages, lowest first: each may import only those before it."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(child) for child in ast.walk(node))
    return hidden


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every runtime import of ``sensisearch`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hidden = type_checking_nodes(tree)
    name = module_name(path)
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "sensisearch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "sensisearch":
                continue
            # `from pkg import submodule` depends on the submodule; `from mod import name` on mod.
            for alias in node.names:
                target = f"{module}.{alias.name}"
                out.append((target if target in known else module, node.lineno))
    return out


def package_graph(paths: list[Path]) -> dict[str, list[tuple[str, int]]]:
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {module_name(p): imports_of(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (iterative DFS, colours)."""
    colour: dict[str, int] = defaultdict(int)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour[child] == 1:
                    return path[path.index(child):] + [child]
                if colour[child] == 0:
                    colour[child] = 1
                    path.append(child)
                    stack.append((child, iter(sorted(graph.get(child, ())))))
                    break
            else:
                colour[node] = 2
                path.pop()
                stack.pop()
    return None


def unit(module: str) -> str:
    """The package a module belongs to for layering: ``sensisearch.X``, or ``sensisearch.study.Y``."""
    parts = module.split(".")
    depth = 3 if len(parts) > 2 and parts[1] == "study" and parts[2] in STUDY_LAYERS else 2
    return ".".join(parts[:depth])


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    return package_graph(sorted(PACKAGE.rglob("*.py")))


def test_cycle_finder_finds_a_planted_cycle() -> None:
    # The checker itself, on graphs whose answer is known.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_back(graph: dict[str, list[tuple[str, int]]]) -> None:
    edges = {m: {t for t, _ in targets if t != m} for m, targets in graph.items()}
    assert find_cycle(edges) is None


def test_no_package_imports_back_up(graph: dict[str, list[tuple[str, int]]]) -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        for target, _ in targets:
            if unit(target) != unit(module):
                edges[unit(module)].add(unit(target))
    assert find_cycle(edges) is None


def test_study_layers_point_down(graph: dict[str, list[tuple[str, int]]]) -> None:
    wrong = []
    for module, targets in graph.items():
        for target, line in targets:
            here, there = unit(module).split("."), unit(target).split(".")
            if len(here) == 3 and len(there) == 3 and STUDY_LAYERS.index(there[2]) > STUDY_LAYERS.index(here[2]):
                wrong.append(f"{module}:{line} imports {target}")
    assert wrong == []


def test_only_the_cli_imports_the_study(graph: dict[str, list[tuple[str, int]]]) -> None:
    wrong = [
        f"{m}:{line} imports {t}" for m, targets in graph.items() for t, line in targets
        if t.startswith("sensisearch.study") and not m.startswith(("sensisearch.study", "sensisearch.cli"))
    ]
    assert wrong == []


def private_imports(paths: list[Path], own: str) -> list[str]:
    """Imports of a private module (a ``_name`` segment) of any package other than ``own``."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    wrong = []
    for path in paths:
        for target, line in imports_of(path, known):
            if target.startswith(own + ".") and own:
                continue
            if any(part.startswith("_") for part in target.split(".")[1:]):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return wrong


def test_cli_and_benchmarks_use_the_public_api() -> None:
    assert private_imports(sorted((PACKAGE / "cli").rglob("*.py")), "sensisearch.cli") == []
    assert private_imports(sorted((REPO / "benchmarks").glob("*.py")), "") == []


def test_private_import_is_detected(tmp_path: Path) -> None:
    bench = REPO / "benchmarks" / "_import_graph_probe.py"
    bench.write_text("from sensisearch.study.run._prepare import prepare\n")
    try:
        assert private_imports([bench], "") == ["benchmarks/_import_graph_probe.py:1 imports sensisearch.study.run._prepare"]
    finally:
        bench.unlink()


def test_code_names_concepts_not_tickets() -> None:
    ticket = re.compile(r"\b[Ii]ssues? \d+|\bticket \d+")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")])
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if ticket.search(line)
    ]
    assert hits == []


def test_every_benchmark_import_resolves() -> None:
    # Benchmarks do not run in CI: an import of a moved or renamed name would go unnoticed.
    import importlib

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "sensisearch":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert missing == []
