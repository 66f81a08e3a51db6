"""Teacher adapters, registered by kind. A new adapter is one module that registers itself here."""

from kdpipe.registry import Registry

TEACHERS: Registry = Registry("teacher kind")

from teachers import base as _base  # noqa: E402,F401
from teachers import mlp as _mlp  # noqa: E402,F401
from teachers import aspects as _aspects  # noqa: E402,F401

Teacher = _base.Teacher
