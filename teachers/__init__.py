"""Teacher adapters, registered by kind. A new adapter is one module here that registers itself."""

from kdpipe.registry import Registry, import_submodules

TEACHERS: Registry = Registry("teacher kind")

from teachers.base import Teacher  # noqa: E402

import_submodules(__name__)

__all__ = ["TEACHERS", "Teacher"]
