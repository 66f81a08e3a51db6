"""Hinton KD on cached teacher logits, dense or top-k with a tail bucket."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import kd_dense, kd_topk


class KDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    temperature: float = Field(4.0, gt=0)
    use_topk: bool = Field(False, description="read the top-k cache columns instead of dense logits")
    output: str = Field("logits", description="student output to distil into")


@LOSSES.register("kd")
class KDLoss(Loss):
    """T² · KL(p_T || q_S) on every row, labeled or not (unlabeled data is the normal case)."""

    Params = KDParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"topk"} if params.use_topk else {"logits"}

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        s = student[self.p.output]
        if self.p.use_topk:
            value = kd_topk(
                s, batch[f"{tid}.topk_idx"], batch[f"{tid}.topk_val"], batch[f"{tid}.tail_lse"], self.p.temperature
            )
        else:
            value = kd_dense(s, batch[f"{tid}.logits"], self.p.temperature)
        return value, {}
