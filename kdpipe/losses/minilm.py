"""MiniLM deep self-attention distillation (Wang et al., 2020).

Two KL terms on the last transformer layer, both per head and per (real) query token:
  attention:      KL( A_t || A_s ),  A = softmax(Q·Kᵀ/√d_k)        (teacher's heads = student's heads)
  value relation: KL( VR_t || VR_s ), VR = softmax(V·Vᵀ/√d_r)        (V split into R relation heads)
The teacher side is cached as probabilities (`<tid>.attn_rel`, `<tid>.value_rel`, fp16, flattened
(H·L·L)); the student returns the pre-softmax, key-masked logits (`attn_logits`, `value_logits`).
Padded keys carry (almost) zero teacher mass; padded query rows are left out of the mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss

MASKED = -1e4  # additive logit for padded keys (finite: exp underflows to 0, gradients stay clean)


def relation_logits(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, D) x (N, L, D) -> (N, heads, L, L) scaled dot products a_h·b_hᵀ/√(D/heads), padded keys masked.

    Attention logits are ``relation_logits(Q, K, mask, H)``; value-relation logits ``relation_logits(V, V, mask, R)``.
    """
    n, L, d = a.shape
    if d % heads:
        raise ValueError(f"width {d} is not divisible by {heads} relation heads")
    dk = d // heads
    qa = a.reshape(n, L, heads, dk).transpose(1, 2)
    kb = b.reshape(n, L, heads, dk).transpose(1, 2)
    s = qa @ kb.transpose(-1, -2) / math.sqrt(dk)
    keep = mask.to(torch.bool)[:, None, None, :]
    return s.masked_fill(~keep, MASKED)


def relation_kl(teacher_probs: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows, heads and real query tokens of KL(p_t || softmax(student_logits)) along the key axis.

    ``teacher_probs`` (N, H, L, L) may come from fp16 storage: rows are renormalised first.
    """
    p = teacher_probs.float().clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    logq = F.log_softmax(student_logits.float(), dim=-1)
    logp = torch.log(p.clamp(min=1e-30))
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)  # (N, H, L)
    q_mask = mask.to(kl.dtype)[:, None, :]  # (N, 1, L)
    denom = (q_mask.sum() * kl.shape[1]).clamp(min=1.0)
    return (kl * q_mask).sum() / denom


class MiniLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    attention_weight: float = Field(1.0, ge=0)
    value_weight: float = Field(1.0, ge=0)
    attn_output: str = Field("attn_logits", description="student output holding last-layer attention logits")
    value_output: str = Field("value_logits", description="student output holding last-layer value-relation logits")


@LOSSES.register("minilm")
class MiniLMLoss(Loss):
    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return (
            {"tokens"}
            | ({"attn_rel"} if params.attention_weight else set())
            | ({"value_rel"} if params.value_weight else set())
        )

    """attention_weight · KL(attention) + value_weight · KL(value relation); needs the teacher's
    `attn_rel`, `value_rel` and `tokens` outputs and a student with `relations: true`."""

    Params = MiniLMParams

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        mask = batch[f"{tid}.attention_mask"]
        n, L = mask.shape
        parts: dict[str, torch.Tensor] = {}
        total = None
        for key, out_key, w in (
            ("attn_rel", self.p.attn_output, self.p.attention_weight),
            ("value_rel", self.p.value_output, self.p.value_weight),
        ):
            if w == 0:
                continue
            if out_key not in student:
                raise KeyError(
                    f"minilm loss: the student returned no '{out_key}' (set student.params.relations: true; "
                    f"it returns {sorted(student)})"
                )
            col = f"{tid}.{key}"
            if col not in batch:
                raise KeyError(f"minilm loss: no cached '{col}'; add '{key}' to the outputs of teacher '{tid}'")
            s = student[out_key]
            t = batch[col].reshape(n, -1, L, L)
            if t.shape != s.shape:
                raise ValueError(
                    f"minilm loss: teacher {key} has shape {tuple(t.shape)} but the student's {out_key} "
                    f"{tuple(s.shape)}: use the same number of (relation) heads and max_length"
                )
            v = relation_kl(t, s, mask)
            parts[key] = v
            total = w * v if total is None else total + w * v
        assert total is not None, "minilm loss: both weights are 0"
        return total, parts
