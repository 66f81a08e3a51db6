"""Universal Logit Distillation per token (Boizard et al. 2024): L1 between *sorted* probability vectors.

Sorting forgets which id holds which probability, so teacher and student need no shared
vocabulary (cross-tokenizer distillation; positions must still be aligned by the loader). A top-k
teacher contributes its cached k probabilities, compared with the student's k largest; a dense
teacher's whole sorted distribution is compared with the student's, the shorter padded with zeros
(as TRL's GOLD does). Not scaled by T².
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from kdpipe.lm.token_functional import TeacherSignal, sorted_l1_rows, sorted_probs, sparse_sorted_probs
from kdpipe.losses import LOSSES
from kdpipe.losses.token_kl import TokenDistParams, TokenDistributionLoss


class ULDParams(TokenDistParams):
    top_k: int | None = Field(
        None,
        ge=1,
        description="compare only the k largest probabilities (default: the cache's k "
        "for a top-k teacher, every id for a dense one)",
    )
    teacher_vocab: int | None = Field(
        None,
        ge=1,
        description="teacher vocabulary size, used only to spread a top-k "
        "teacher's tail at temperature != 1 (default: the student's)",
    )


@LOSSES.register("uld")
class ULDLoss(TokenDistributionLoss):
    """Σ_i |p_(i) − q_(i)| over the sorted probabilities at T, per real token."""

    Params = ULDParams
    scale_by_t2: ClassVar[bool] = False
    shares_vocab: ClassVar[bool] = False

    def token_values(self, s: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
        T = self.p.temperature
        if teacher.is_sparse:
            assert teacher.topk_logp is not None and teacher.tail_logp is not None
            p = sparse_sorted_probs(
                teacher.topk_logp, teacher.tail_logp, self.p.teacher_vocab or s.shape[1], T, self.p.top_k
            )
            q = sorted_probs(s, T, p.shape[1])
        else:
            assert teacher.logits is not None
            p = sorted_probs(teacher.logits, T, self.p.top_k)
            q = sorted_probs(s, T, self.p.top_k)
        return sorted_l1_rows(p, q)
