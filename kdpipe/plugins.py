"""The names of the plugins, known without importing them.

Every teacher, student, loss and evaluator registers itself with a decorator
(`@LOSSES.register("kd")`). Importing the plugins imports torch and transformers, seconds before
a spec's typo could be reported; reading their source for those decorators takes milliseconds.
So the spec schema checks names against this index, and `kdpipe.config.check_spec` — which
imports the registries — stays the authority (a plugin that registers in another way is still
found there).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

# registry variable -> (what a user calls it, the packages or modules whose files register into it)
REGISTRIES = {
    "TEACHERS": ("teacher kind", ("teachers",)),
    "STUDENTS": ("student kind", ("students",)),
    "LOSSES": ("loss", ("kdpipe.losses",)),
    "EVALUATORS": ("evaluator", ("kdpipe.evaluators",)),
}


def _files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        return sorted(p for p in origin.parent.glob("*.py"))
    return [origin]


@functools.lru_cache(maxsize=256)
def _registered_in(path: str, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    """(registry variable, name) pairs a file registers, read from its source; cached per file
    version so a plugin file added to a long-lived process (a notebook, a test session) is seen."""
    text = Path(path).read_text()
    if ".register(" not in text:
        return ()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return ()  # importing the file reports it, with its line (`kdpipe.registry.import_submodules`)
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "register"
            and isinstance(node.func.value, ast.Name)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.func.value.id, node.args[0].value))
    return tuple(out)


def declared() -> dict[str, frozenset[str]]:
    """Registry variable -> the names its plugin files register, read from their source."""
    out: dict[str, set[str]] = {name: set() for name in REGISTRIES}
    for var, (_, modules) in REGISTRIES.items():
        for module in modules:
            for f in _files(module):
                out[var].update(n for v, n in _registered_in(str(f), f.stat().st_mtime_ns) if v == var)
    return {k: frozenset(v) for k, v in out.items()}


def _imported(var: str, name: str) -> bool:
    """True when the registry is already imported in this process and holds `name` (a plugin
    registered some other way than a decorator in the package's files)."""
    module = sys.modules.get(REGISTRIES[var][1][0])
    registry = getattr(module, var, None)
    return registry is not None and name in registry.names()


def unknown(var: str, name: Any, where: str, index: dict[str, frozenset[str]] | None = None) -> str | None:
    """An error naming `where` when `name` is not a declared plugin of registry `var`; None when it is.
    `index`: `declared()`, read once by a caller that asks about several names."""
    names = (index or declared())[var]
    if not names or not isinstance(name, str) or name in names or _imported(var, name):
        return None  # nothing found (an unusual install): the registries decide later
    kind = REGISTRIES[var][0]
    return f"{where}: unknown {kind} '{name}'; available: {', '.join(sorted(names))}"


def name_errors(raw: Any) -> list[str]:
    """Unknown plugin names in a raw spec mapping, each naming its YAML key (best effort on any shape)."""
    if not isinstance(raw, dict):
        return []
    index = declared()
    errs: list[str | None] = []
    for i, t in enumerate(raw.get("teachers") or [] if isinstance(raw.get("teachers"), list) else []):
        if isinstance(t, dict) and "kind" in t:
            errs.append(unknown("TEACHERS", t["kind"], f"teachers[{i}].kind", index))
    student = raw.get("student")
    if isinstance(student, dict) and "kind" in student:
        errs.append(unknown("STUDENTS", student["kind"], "student.kind", index))
    for key in ("losses",):
        for i, loss in enumerate(raw.get(key) or [] if isinstance(raw.get(key), list) else []):
            if isinstance(loss, dict) and "name" in loss:
                errs.append(unknown("LOSSES", loss["name"], f"{key}[{i}].name", index))
    ev = raw.get("evaluate")
    if isinstance(ev, dict):
        if "task" in ev:
            errs.append(unknown("EVALUATORS", ev["task"], "evaluate.task", index))
        for i, loss in enumerate(
            ev.get("baseline_losses") or [] if isinstance(ev.get("baseline_losses"), list) else []
        ):
            if isinstance(loss, dict) and "name" in loss:
                errs.append(unknown("LOSSES", loss["name"], f"evaluate.baseline_losses[{i}].name", index))
    return [e for e in errs if e]


def describe_registered() -> str:
    """Every registered plugin, one line each: what `kdpipe plugins` prints. Imports the registries
    (and so torch): for people, not for the spec check."""
    import importlib

    lines = []
    for var, (kind, modules) in REGISTRIES.items():
        registry = getattr(importlib.import_module(modules[0]), var)
        lines.append(("losses" if kind == "loss" else f"{kind}s") + ":")
        for name in registry.names():
            obj = registry.get(name)
            doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
            outputs = getattr(obj, "supported_outputs", None)
            extra = f" [outputs: {', '.join(sorted(outputs))}]" if outputs else ""
            lines.append(f"  {name}{extra}" + (f" — {doc}" if doc else ""))
    return "\n".join(lines) + "\nthe params of each: docs/spec.md"
