"""FitNets-style hidden-state matching for token encoders: masked MSE(W·h_s, h_t) per mapped layer.

``layer_map: {student_layer: teacher_layer}`` pairs the student's ``hidden.<i>`` output (N, L, H_s)
with the teacher's cached ``<tid>.feat.<j>`` column (N, L·H_t, fp16). Layer 0 is the embedding
output, layer i the output of block i (Hugging Face ``hidden_states`` numbering). When widths
differ (or ``project: true``) a learned linear projection W maps H_s -> H_t; it lives in the loss
and is trained with the student. Padded tokens (attention_mask 0) are left out.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, LossContext


def masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_real tokens ||s - t||² / (real tokens · width); s, t (N, L, H), mask (N, L)."""
    m = mask.to(s.dtype)[..., None]
    return (((s - t) ** 2) * m).sum() / (m.sum() * s.shape[-1]).clamp(min=1.0)


class HiddenMSEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    layer_map: dict[int, int] = Field(description="student layer -> teacher layer, e.g. {1: 2, 2: 4, 3: 6}")
    project: bool | None = Field(None, description="learned projection W (default: only when widths differ)")
    student_prefix: str = "hidden."

    @field_validator("layer_map")
    @classmethod
    def _nonempty(cls, v: dict[int, int]) -> dict[int, int]:
        if not v:
            raise ValueError("layer_map needs at least one `student_layer: teacher_layer` pair")
        if any(k < 0 or x < 0 for k, x in v.items()):
            raise ValueError("layer numbers are >= 0 (0 = embedding output)")
        return v


@LOSSES.register("hidden_mse")
class HiddenMSELoss(Loss):
    Params = HiddenMSEParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"features", "tokens"}

    def __init__(self, params: HiddenMSEParams, ctx: LossContext) -> None:
        super().__init__(params, ctx)
        self.tid = ctx.teacher(params.teacher)
        self.proj = nn.ModuleDict()
        self.teacher_width: dict[int, int] = {}
        seq = ctx.widths.get(f"{self.tid}.attention_mask")
        for s_layer, t_layer in params.layer_map.items():
            t_col = f"{self.tid}.feat.{t_layer}"
            s_key = f"student.{params.student_prefix}{s_layer}"
            if ctx.widths and t_col not in ctx.widths:
                have = sorted(k for k in ctx.widths if k.startswith(f"{self.tid}.feat."))
                raise ValueError(
                    f"hidden_mse: no cached '{t_col}' (cached: {have}); add {t_layer} to teacher "
                    f"'{self.tid}' params.layers and 'features' to its outputs"
                )
            if ctx.widths and s_key not in ctx.widths:
                have = sorted(k for k in ctx.widths if k.startswith("student."))
                raise ValueError(
                    f"hidden_mse: the student has no output '{s_key.removeprefix('student.')}' (it has {have})"
                )
            if not ctx.widths:
                continue
            if seq is None:
                raise ValueError(f"hidden_mse: needs teacher '{self.tid}' output 'tokens' (its attention_mask)")
            ht, hs = ctx.widths[t_col] // seq, ctx.widths[s_key]
            self.teacher_width[t_layer] = ht
            if params.project or (params.project is None and hs != ht):
                self.proj[str(s_layer)] = nn.Linear(hs, ht)

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch[f"{self.tid}.attention_mask"]
        n, L = mask.shape
        parts: dict[str, torch.Tensor] = {}
        for s_layer, t_layer in self.p.layer_map.items():
            s = student[f"{self.p.student_prefix}{s_layer}"].float()
            if str(s_layer) in self.proj:
                s = self.proj[str(s_layer)](s)
            t = batch[f"{self.tid}.feat.{t_layer}"].float().reshape(n, L, -1)
            if s.shape != t.shape:
                raise ValueError(
                    f"hidden_mse: student layer {s_layer} {tuple(s.shape)} vs teacher layer {t_layer} "
                    f"{tuple(t.shape)}; set `project: true` or match max_length"
                )
            parts[f"l{s_layer}_{t_layer}"] = masked_mse(s, t, mask)
        total = torch.stack(list(parts.values())).mean()
        return total, parts
