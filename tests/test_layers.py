"""The house has no import circles: the import graph of kdpipe, teachers and students, built from
the source with `ast` — imports inside functions included, type-checking-only imports left out (they
never run) — has no cycle. And the layers the design names hold: the bottom modules import nothing
of kdpipe, and the spec schema imports no plugin (so a spec's shape is checked without torch)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("kdpipe", "teachers", "students")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in its file."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    out: set[str] = set()

    def resolve(t: str) -> str | None:  # the longest known module a dotted name starts with
        while t and t not in known:
            t = t.rpartition(".")[0]
        return t or None

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            found = {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one, else a name of the package
            found = {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else resolve(node.module)
                for a in node.names
            }
        else:
            continue
        out |= {m for m in found if m and m != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    g = graph()
    assert len(g) > 60 and sum(len(v) for v in g.values()) > 150  # the graph is really read
    assert cycles(g) == []


def test_the_detector_finds_a_cycle_through_an_import_inside_a_function() -> None:
    """The check can fail: two modules that import each other, one only inside a function."""
    g = graph()
    g["kdpipe.storage"] = g["kdpipe.storage"] | {"kdpipe.pipeline"}  # as a function-level import would add
    assert any("kdpipe.storage" in c and "kdpipe.pipeline" in c for c in cycles(g))


def test_the_floors_the_design_names() -> None:
    g = graph()
    for bottom in ("kdpipe.errors", "kdpipe.arrays", "kdpipe.registry", "kdpipe.stderr_filter"):
        assert g[bottom] == set(), (bottom, g[bottom])
    light = {"kdpipe.spec", "kdpipe.plugins", "kdpipe.errors", "kdpipe.cli"}
    for m in ("kdpipe.spec", "kdpipe.plugins"):
        assert g[m] <= light, (m, g[m] - light)  # the schema knows no plugin: a spec's shape is checked without torch
    plugins = {m for m in g if m.startswith(("teachers.", "students.", "kdpipe.losses.", "kdpipe.evaluators."))}
    stages = {"kdpipe.pipeline", "kdpipe.ops", "kdpipe.cli", "kdpipe.config", "kdpipe.teach", "kdpipe.train"}
    for m in plugins:
        assert not g[m] & stages, (m, g[m] & stages)  # a plugin is imported by the stages, never the other way
