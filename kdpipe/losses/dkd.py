"""Decoupled KD (Zhao et al., CVPR 2022): KD split into target-class and non-target-class parts.

With ``b = [p_y, 1 - p_y]`` the binary (target vs rest) distribution and ``p̂`` the distribution
over the non-target classes only (both at temperature T):

    TCKD = KL(b_teacher || b_student)        NCKD = KL(p̂_teacher || p̂_student)
    DKD  = T² · (alpha · TCKD + beta · NCKD)

Classic KD is the special case ``KD = TCKD + (1 - p_y^teacher) · NCKD``; DKD frees the NCKD weight
from the teacher's target confidence. The target class is the label; rows without one (label -1:
the normal case) use the teacher's argmax, or are skipped (``unlabeled: skip``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import dense_from_topk


def dkd_terms(
    s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (TCKD, NCKD) at temperature T, without the T² factor. Shapes: (N, C), (N, C), (N,)."""
    T = temperature
    gt = F.one_hot(target.long(), s.shape[1]).bool()
    ls = F.log_softmax(s.float() / T, dim=1)
    lt = F.log_softmax(t.float() / T, dim=1)
    neg_inf = torch.finfo(ls.dtype).min

    def binary(lp: torch.Tensor) -> torch.Tensor:  # log [p_y, 1 - p_y], stable for p_y -> 1
        return torch.stack([lp.masked_fill(~gt, neg_inf).logsumexp(1), lp.masked_fill(gt, neg_inf).logsumexp(1)], dim=1)

    bs, bt = binary(ls), binary(lt)
    tckd = (bt.exp() * (bt - bs)).sum(1)
    # non-target distributions: the softmax over the other classes (the target logit removed)
    ns = F.log_softmax((s.float() / T).masked_fill(gt, neg_inf), dim=1)
    nt = F.log_softmax((t.float() / T).masked_fill(gt, neg_inf), dim=1)
    nckd = torch.where(gt, torch.zeros_like(nt), nt.exp() * (nt - ns)).sum(1)
    return tckd, nckd


class DKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")
    use_topk: bool = Field(False, description="rebuild dense teacher logits from the top-k cache columns")
    unlabeled: Literal["teacher_argmax", "skip"] = Field("teacher_argmax", description="target class of unlabeled rows")
    output: str = "logits"


@LOSSES.register("dkd")
class DKDLoss(Loss):
    Params = DKDParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"topk"} if params.use_topk else {"logits"}

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        s = student[self.p.output]
        if self.p.use_topk:
            t = dense_from_topk(
                batch[f"{tid}.topk_idx"], batch[f"{tid}.topk_val"], batch[f"{tid}.tail_lse"], s.shape[1]
            )
        else:
            t = batch[f"{tid}.logits"].float()
        label = batch["label"].long()
        if self.p.unlabeled == "skip":
            keep = label >= 0
            if not bool(keep.any()):
                zero = s.sum() * 0.0
                return zero, {"tckd": zero.detach(), "nckd": zero.detach()}
            s, t, target = s[keep], t[keep], label[keep]
        else:
            target = torch.where(label >= 0, label, t.argmax(1))
        tckd, nckd = dkd_terms(s, t, target, self.p.temperature)
        T2 = self.p.temperature**2
        tckd, nckd = tckd.mean() * T2, nckd.mean() * T2
        return self.p.alpha * tckd + self.p.beta * nckd, {"tckd": tckd, "nckd": nckd}
