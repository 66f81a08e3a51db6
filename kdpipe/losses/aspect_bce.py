"""Multi-aspect KD (Multi-aspect Knowledge Distillation with LLM): the student's extra ``aspects``
outputs learn an aspect teacher's yes/no answers as soft targets:

    BCE(sigmoid(s_aspect), sigmoid(t_aspect / T))     averaged over rows and aspects

The loss's ``weight`` in the spec is the paper's λ. Every row counts, labeled or not: the aspect
answers come from a model (e.g. the ``class_aspects`` teacher), never from ground-truth labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, output_of_column


class AspectBCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="id of the aspect teacher (default: the only teacher)")
    temperature: float = Field(1.0, gt=0, description="soft targets sigmoid(teacher aspect logit / T)")
    output: str = Field("aspects", description="student output holding the aspect logits")
    teacher_output: str = Field("aspects", description="cached teacher column with the aspect logits")


def aspect_bce(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean BCE between sigmoid(s) and the soft targets sigmoid(t / T)."""
    return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t.float() / temperature))


@LOSSES.register("aspect_bce")
class AspectBCELoss(Loss):
    Params = AspectBCEParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {output_of_column(params.teacher_output)}

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        if self.p.output not in student:
            raise KeyError(
                f"aspect_bce: the student has no '{self.p.output}' output; give it aspect units "
                f"(student.params.aspects: A for the mlp student)"
            )
        s, t = student[self.p.output], batch[f"{tid}.{self.p.teacher_output}"]
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"aspect_bce: student has {s.shape[1]} aspect outputs, teacher '{tid}' answers {t.shape[1]} "
                f"aspects; set student.params.aspects: {t.shape[1]}"
            )
        return aspect_bce(s, t, self.p.temperature), {}
