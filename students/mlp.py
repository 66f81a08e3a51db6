"""An MLP student for vector inputs, optionally widened by A aspect outputs (multi-aspect KD)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from students import STUDENTS


class MLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = [64]
    dropout: float = Field(0.0, ge=0, lt=1)
    aspects: int = Field(0, ge=0, description="extra sigmoid outputs for multi-aspect KD")


@STUDENTS.register("mlp")
class MLPStudent(nn.Module):
    Params = MLPParams

    def __init__(
        self, in_dim: int, num_classes: int, hidden: list[int], dropout: float = 0.0, aspects: int = 0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes + aspects)
        self.num_classes = num_classes

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.body(batch["x"])
        z = self.head(h)
        out = {"logits": z[:, : self.num_classes], "hidden": h}
        if z.shape[1] > self.num_classes:
            out["aspects"] = z[:, self.num_classes :]
        return out
