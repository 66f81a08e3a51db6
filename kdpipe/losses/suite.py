"""The spec's losses composed with their weights: what the training loop calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdpipe.losses import LOSSES
from kdpipe.losses.base import LossContext


class LossSuite(nn.Module):
    """Σ weight_i · loss_i, with every part reported under the loss's name."""

    def __init__(self, specs: list[dict[str, Any]], ctx: LossContext) -> None:
        super().__init__()
        self.items = nn.ModuleList()
        self.weights: list[float] = []
        self.names: list[str] = []
        for spec in specs:
            spec = dict(spec)
            name, weight = spec.pop("name"), float(spec.pop("weight", 1.0))
            cls = LOSSES.get(name)
            self.items.append(cls(cls.Params(**spec), ctx))
            self.weights.append(weight)
            label = name if name not in self.names else f"{name}_{len(self.names)}"
            self.names.append(label)

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for name, w, loss in zip(self.names, self.weights, self.items):
            value, sub = loss(student, batch)
            parts[name] = value.detach()
            for k, v in sub.items():
                parts[f"{name}.{k}"] = v.detach()
            total = w * value if total is None else total + w * value
        assert total is not None
        return total, parts
