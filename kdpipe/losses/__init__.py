"""Distillation losses, registered by name; the spec composes them with weights.

A loss is an `nn.Module` built from its validated `Params` and a `LossContext`; it is called
as ``loss(student_out, batch)`` and returns ``(scalar, {part: value})``. Cached teacher
outputs arrive in the batch as ``"<teacher_id>.<column>"`` tensors, labels as ``label``
(-1 where the row is unlabeled).
"""

from kdpipe.registry import Registry, import_submodules

LOSSES: Registry = Registry("loss")

from kdpipe.losses.base import Loss, LossContext  # noqa: E402

import_submodules(__name__)


def vocabulary_bound(specs: list[dict[str, object]]) -> list[str]:
    """The names of the losses in `specs` ({name, **params}) that compare a teacher's and the
    student's token distributions id by id, so they need one shared vocabulary."""
    out = []
    for spec in specs:
        params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        cls = LOSSES.get(str(spec["name"]))
        if cls.shares_vocab and cls.teacher_reads(cls.Params(**params)):
            out.append(str(spec["name"]))
    return out


__all__ = ["LOSSES", "Loss", "LossContext", "vocabulary_bound"]
