"""Hierarchical multi-exit self-distillation (BYOT / "One Model to Train them All").

For a student with ``exits`` (logits after each block, shallow -> deep), every shallower exit is
taught by a deeper one, detached (so the teacher exit is not pulled towards its students):

    kl_weight · Σ_{e < last} T² · KL(softmax(z_teacher(e)/T) || softmax(z_e/T))
  + ce_weight · Σ_e CE(z_e, y)            (labeled rows only)

with ``teacher(e)`` = the deepest exit (``mode: deepest``) or exit e+1 (``mode: next``). With
``kl_weight: 0`` this is plain per-exit CE: the baseline twin of a self-distilled student. KD from a
cached teacher into the deepest exit composes with the ``kd`` loss (``output: logits``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import kd_dense, masked_ce


class SelfDistillParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["deepest", "next"] = Field("deepest", description="which exit teaches a shallower one")
    temperature: float = Field(3.0, gt=0)
    kl_weight: float = Field(1.0, ge=0, description="weight of the exit-to-exit KL terms (0: per-exit CE only)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the per-exit CE on labeled rows (0: none)")
    ce_on_deepest: bool = Field(
        True, description="include the deepest exit in the per-exit CE (off when a `ce` loss covers it)"
    )
    output: str = Field("exits", description="student output holding the list of exit logits")


@LOSSES.register("self_distill")
class SelfDistillLoss(Loss):
    Params = SelfDistillParams

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        exits = student.get(self.p.output)
        if not exits:
            raise KeyError(f"self_distill: the student has no '{self.p.output}' output (use a multi-exit student)")
        n = len(exits)
        zero = exits[-1].sum() * 0.0
        parts: dict[str, torch.Tensor] = {}
        kl = zero
        if self.p.kl_weight > 0:
            for e in range(n - 1):
                teacher = exits[-1] if self.p.mode == "deepest" else exits[e + 1]
                v = kd_dense(exits[e], teacher.detach(), self.p.temperature)
                parts[f"kl_exit{e}"] = v
                kl = kl + v
        ce = zero
        if self.p.ce_weight > 0:
            for e in range(n if self.p.ce_on_deepest else n - 1):
                ce = ce + masked_ce(exits[e], batch["label"])
        parts["kl"], parts["ce"] = kl, ce
        return self.p.kl_weight * kl + self.p.ce_weight * ce, parts
