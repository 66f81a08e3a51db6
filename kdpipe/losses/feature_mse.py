"""FitNets-style hidden-state matching: ``MSE(W·h_s, h_t)`` with a learned projection W.

W is an ``nn.Linear(d_student, d_teacher)`` when the widths differ (sized from
``LossContext.widths``: ``student.<student_output>`` and ``<teacher>.<teacher_output>``), the identity
when they agree. It lives in the loss module, so the train loop optimises (and DDP syncs) it with
the student. ``normalize: true`` compares L2-normalised vectors (scale-free; MSE = (2 - 2·cos)/D).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, LossContext, output_of_column


class FeatureMSEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    student_output: str = Field("hidden", description="student output to project (e.g. hidden)")
    teacher_output: str = Field("embedding", description="cached teacher column (e.g. embedding, feat.<layer>)")
    normalize: bool = Field(False, description="L2-normalise both vectors before the MSE")


@LOSSES.register("feature_mse")
class FeatureMSELoss(Loss):
    Params = FeatureMSEParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {output_of_column(params.teacher_output)}

    def __init__(self, params: FeatureMSEParams, ctx: LossContext) -> None:
        super().__init__(params, ctx)
        self.tid = ctx.teacher(params.teacher)
        skey, tkey = f"student.{params.student_output}", f"{self.tid}.{params.teacher_output}"
        missing = [k for k in (skey, tkey) if k not in ctx.widths]
        if missing:
            raise ValueError(f"feature_mse: unknown width of {missing}; known widths: {sorted(ctx.widths)}")
        ds, dt = ctx.widths[skey], ctx.widths[tkey]
        self.proj: nn.Module = nn.Linear(ds, dt) if ds != dt else nn.Identity()

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.proj(student[self.p.student_output])
        t = batch[f"{self.tid}.{self.p.teacher_output}"].float()
        if self.p.normalize:
            h, t = F.normalize(h, dim=-1), F.normalize(t, dim=-1)
        return F.mse_loss(h, t), {}
