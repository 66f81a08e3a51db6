"""Train-time logit fusion: fuse the per-teacher cached logits of the batch (static, uniform or
dynamic per-example weights, see `kdpipe.fusion`) and distil the student from the fused
distribution with Hinton KD. The teacher-side alternative is `teach.fusion` (a `fused` cache)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdpipe.fusion import FusionLossParams, fuse
from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import dense_from_topk, kd_dense


class FusionKDParams(FusionLossParams):
    teachers: list[str] = Field(min_length=1, description="teacher ids whose cached logits are fused")
    temperature: float = Field(4.0, gt=0, description="KD temperature")
    use_topk: bool = Field(False, description="rebuild dense logits from the top-k cache columns")
    output: str = "logits"


@LOSSES.register("fusion_kd")
class FusionKDLoss(Loss):
    Params = FusionKDParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"topk"} if params.use_topk else {"logits"}

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = student[self.p.output]
        logits = []
        for tid in self.p.teachers:
            if self.p.use_topk:
                logits.append(
                    dense_from_topk(
                        batch[f"{tid}.topk_idx"], batch[f"{tid}.topk_val"], batch[f"{tid}.tail_lse"], s.shape[1]
                    )
                )
            else:
                logits.append(batch[f"{tid}.logits"].float())
        with torch.no_grad():
            fused, w = fuse(
                logits, self.p.mode, self.p.weights, self.p.fusion_temperature, self.p.steps, self.p.sharpness
            )
        parts = {f"w_{tid}": w[:, i].mean() for i, tid in enumerate(self.p.teachers)}
        return kd_dense(s, fused.to(s.device), self.p.temperature), parts
