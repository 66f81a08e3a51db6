"""A multi-exit MLP: a classifier head after every block, so shallow exits can run alone."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from students import STUDENTS


class MultiExitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = Field([64, 64, 64], min_length=2)
    dropout: float = Field(0.0, ge=0, lt=1)


@STUDENTS.register("multi_exit_mlp")
class MultiExitMLP(nn.Module):
    """``exits[i]`` are the logits after block i; ``logits`` is the deepest exit."""

    Params = MultiExitParams

    def __init__(self, in_dim: int, num_classes: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        d = in_dim
        for h in hidden:
            self.blocks.append(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)))
            self.heads.append(nn.Linear(h, num_classes))
            d = h

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        h = batch["x"]
        exits = []
        for block, head in zip(self.blocks, self.heads):
            h = block(h)
            exits.append(head(h))
        return {"logits": exits[-1], "exits": exits, "hidden": h}
