"""Hidden-state matching for causal LMs: MSE or cosine between mapped student and teacher layers.

``layer_map: {student_layer: teacher_layer}`` pairs ``student["hidden_states"][i]`` (B, T, H_s;
index 0 = embeddings, Hugging Face numbering) with the teacher's cached ``<tid>.hidden.<j>``
(B, T, H_t). When the widths differ (or ``project: true``) a learned linear map H_s -> H_t lives in
the loss and trains with the student — so it needs both widths up front, from the loss context:
``widths["student.hidden_states"]`` and ``widths["<tid>.hidden.<j>"]``. Every real token counts
(hidden states exist at the last real token too); padding does not.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from kdpipe.lm.token_functional import TeacherSignal, hidden_cosine, hidden_mse
from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, LossContext

STUDENT_WIDTH_KEY = "student.hidden_states"


class HiddenTokenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    layer_map: dict[int, int] = Field(description="student layer -> teacher layer (0 = embeddings), e.g. {2: 4, 4: 8}")
    metric: Literal["mse", "cosine"] = Field(
        "mse", description="'mse' per hidden unit, or 'cosine' (1 − cos per token)"
    )
    project: bool | None = Field(
        None, description="learned projection student -> teacher width (default: only when the widths differ)"
    )
    output: str = Field("hidden_states", description="student output holding the tuple of (B, T, H) hidden states")

    @field_validator("layer_map")
    @classmethod
    def _pairs(cls, v: dict[int, int]) -> dict[int, int]:
        if not v:
            raise ValueError("layer_map needs at least one `student_layer: teacher_layer` pair")
        if any(k < 0 or x < 0 for k, x in v.items()):
            raise ValueError("layer numbers are >= 0 (0 = embedding output)")
        return v


@LOSSES.register("hidden_token")
class HiddenTokenLoss(Loss):
    """Mean over the mapped layer pairs of the per-token hidden-state distance."""

    Params = HiddenTokenParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"hidden"}

    def __init__(self, params: HiddenTokenParams, ctx: LossContext) -> None:
        super().__init__(params, ctx)
        self.tid = ctx.teacher(params.teacher)
        self.proj = nn.ModuleDict()
        hs = ctx.widths.get(STUDENT_WIDTH_KEY)
        for s_layer, t_layer in params.layer_map.items():
            col = TeacherSignal.hidden_column(self.tid, t_layer)
            ht = ctx.widths.get(col)
            differ = hs is not None and ht is not None and hs != ht
            if not (params.project or (params.project is None and differ)):
                continue
            if hs is None or ht is None:
                raise ValueError(
                    f"hidden_token: a projection needs the widths '{STUDENT_WIDTH_KEY}' and '{col}' in the "
                    f"loss context (known: {sorted(ctx.widths)})"
                )
            self.proj[str(s_layer)] = nn.Linear(hs, ht)

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = student[self.p.output]
        mask = batch["attention_mask"].bool()
        distance = hidden_mse if self.p.metric == "mse" else hidden_cosine
        parts: dict[str, torch.Tensor] = {}
        for s_layer, t_layer in self.p.layer_map.items():
            if s_layer >= len(hidden):
                raise ValueError(
                    f"hidden_token: student layer {s_layer} requested but the student returns "
                    f"{len(hidden)} hidden states (0 = embeddings)"
                )
            h = hidden[s_layer].float()
            if str(s_layer) in self.proj:
                h = self.proj[str(s_layer)](h)
            col = TeacherSignal.hidden_column(self.tid, t_layer)
            if col not in batch:
                have = sorted(k for k in batch if k.startswith(f"{self.tid}.hidden."))
                raise KeyError(f"hidden_token: the batch has no '{col}' (teacher hidden columns: {have})")
            t = batch[col].float().to(h.device)
            if h.shape != t.shape:
                raise ValueError(
                    f"hidden_token: student layer {s_layer} {tuple(h.shape)} vs teacher layer {t_layer} "
                    f"{tuple(t.shape)}; set `project: true` (with both widths in the loss context)"
                )
            parts[f"l{s_layer}_{t_layer}"] = distance(h, t, mask.to(h.device))
        total = torch.stack(list(parts.values())).mean()
        parts["tokens"] = mask.sum().float()
        return total, parts
