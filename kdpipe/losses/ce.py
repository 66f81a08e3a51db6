"""Cross-entropy on the labeled rows only (unlabeled rows carry label -1)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import masked_ce


class CEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str = "logits"


@LOSSES.register("ce")
class CELoss(Loss):
    Params = CEParams

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return masked_ce(student[self.p.output], batch["label"]), {}
