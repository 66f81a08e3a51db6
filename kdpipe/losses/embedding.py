"""Embedding distillation for sentence encoders: cosine or MSE between the student's pooled
embedding and the teacher's cached one (``<tid>.embedding``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, output_of_column


class EmbeddingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    output: str = Field("embedding", description="student output to distil into")
    column: str = Field("embedding", description="cached teacher column")


class _EmbeddingLoss(Loss):
    Params = EmbeddingParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {output_of_column(params.column)}

    def _pair(self, student: dict[str, Any], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tid = self.ctx.teacher(self.p.teacher)
        col = f"{tid}.{self.p.column}"
        if col not in batch:
            raise KeyError(
                f"{type(self).__name__}: no cached '{col}'; add '{self.p.column}' to teacher '{tid}' outputs"
            )
        s, t = student[self.p.output].float(), batch[col].float()
        if s.shape != t.shape:
            raise ValueError(
                f"student '{self.p.output}' {tuple(s.shape)} and teacher '{col}' {tuple(t.shape)} differ; "
                "give the student `out_dim:` equal to the teacher's width"
            )
        return s, t


@LOSSES.register("embedding_cosine")
class EmbeddingCosineLoss(_EmbeddingLoss):
    """mean(1 - cos(s, t))."""

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s, t = self._pair(student, batch)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean(), {}


@LOSSES.register("embedding_mse")
class EmbeddingMSELoss(_EmbeddingLoss):
    """mean over rows and dimensions of (s - t)²."""

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s, t = self._pair(student, batch)
        return F.mse_loss(s, t), {}
