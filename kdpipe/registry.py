"""A tiny name -> class registry, so a new method is one file that registers itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PluginImportError(ImportError):
    """A plugin file that does not import (a syntax error, a missing package), named with its file.
    Here, not in `kdpipe.errors`: the registry is a floor that imports nothing of the project."""


class Registry(Generic[T]):
    """Maps names to classes; lookups of unknown names list what exists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(self._unknown(name))
        return self._items[name]

    def check(self, name: str) -> str:
        """`name` if registered, else ValueError listing what is (for spec validators)."""
        if name not in self._items:
            raise ValueError(self._unknown(name))
        return name

    def _unknown(self, name: str) -> str:
        return f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def import_submodules(package: str) -> None:
    """Import every module of a package so their `@REGISTRY.register` decorators run.

    Adding a method is then one new file: nothing else to edit.
    """
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            name = f"{package}.{info.name}"
            try:
                importlib.import_module(name)
            except PluginImportError:
                raise
            except Exception as e:  # a user's new plugin file: say which file and what, not a traceback
                where = f"{pkg.__path__[0]}/{info.name}.py"
                line = f", line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
                raise PluginImportError(
                    f"plugin module {name} ({where}{line}) does not import: {type(e).__name__}: {e}; "
                    "fix the file or move it out of the package (`-v` shows the traceback)"
                ) from e
