"""Student architectures, registered by kind.

A student is an `nn.Module` built as ``cls(in_dim=..., num_classes=..., **params)`` whose
``forward(batch)`` takes the batch dict and returns a dict with at least ``logits``; optional
keys (``aspects``, ``exits``, ``hidden``, ``features.<layer>``) feed the losses that need them.
"""

from kdpipe.registry import Registry, import_submodules

STUDENTS: Registry = Registry("student kind")

import_submodules(__name__)
