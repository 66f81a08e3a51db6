"""Distillation losses, registered by name; the spec composes them with weights.

A loss is an `nn.Module` built from its validated `Params` and a `LossContext`; it is called
as ``loss(student_out, batch)`` and returns ``(scalar, {part: value})``. Cached teacher
outputs arrive in the batch as ``"<teacher_id>.<column>"`` tensors, labels as ``label``
(-1 where the row is unlabeled).
"""

from kdpipe.registry import Registry, import_submodules

LOSSES: Registry = Registry("loss")

from kdpipe.losses.base import Loss, LossContext, LossSuite  # noqa: E402

import_submodules(__name__)

__all__ = ["LOSSES", "Loss", "LossContext", "LossSuite"]
