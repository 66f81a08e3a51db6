"""Loss interface and the weighted composition the train loop calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn


def output_of_column(column: str) -> str:
    """The spec output (`outputs:` name) that caches a teacher column: `feat.<layer>` comes from
    `features`, `hidden.<l>` from `hidden`, the top-k columns from `topk`, others by their own name."""
    if column.startswith("feat."):
        return "features"
    if column.startswith("hidden."):
        return "hidden"
    if column in ("topk_idx", "topk_val", "tail_lse", "topk_lm"):
        return "topk"
    return column


@dataclass
class LossContext:
    """What a loss may need to size itself: label space, teachers, output widths."""

    num_classes: int
    teachers: list[str]
    widths: dict[str, int] = field(default_factory=dict)  # e.g. {"<tid>.embedding": 384, "student.hidden": 64}

    def teacher(self, tid: str | None) -> str:
        if tid is not None:
            return tid
        if len(self.teachers) != 1:
            raise ValueError(f"several teachers {self.teachers}: set `teacher:` on the loss")
        return self.teachers[0]


class Loss(nn.Module):
    """A loss states what it reads, so the spec check can tell a user what to cache before anything runs."""

    Params: ClassVar[type[BaseModel]]
    shares_vocab: ClassVar[bool] = True  # token losses: teacher ids index the student's vocabulary

    @classmethod
    def teacher_reads(cls, params: BaseModel) -> set[str]:
        """The teacher outputs (spec `outputs:` names) this loss reads from each teacher it names
        (`teacher:` or `teachers:`); empty for a loss that reads no teacher."""
        return set()

    def __init__(self, params: BaseModel, ctx: LossContext) -> None:
        super().__init__()
        self.p = params
        self.ctx = ctx

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
