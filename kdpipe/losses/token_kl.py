"""Forward KL per token for causal LMs, and the shared driver of every token-level distribution loss.

A token loss reads the student's next-token logits (B, T, V) and one teacher's signal — the
sparse top-k cache (k ids + tail bucket) or dense logits — counts position t only when tokens t
and t + 1 are real, walks those tokens in chunks (`chunk_tokens`) and returns the mean over them.
The token count is reported as the part ``tokens`` so a data-parallel loop can renormalise by the
global count (Σ value·tokens / Σ tokens) instead of averaging per-worker means.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.lm.token_functional import (
    SignalKind,
    TeacherSignal,
    chunked_token_sum,
    forward_kl_rows,
    next_token_positions,
    paired_logprobs,
)
from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss


class TokenDistParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T applied to teacher and student")
    signal: SignalKind = Field(
        "auto",
        description="teacher signal: 'topk' cache columns, 'dense' logits, or "
        "'auto' (top-k when the batch has it, else dense)",
    )
    chunk_tokens: int = Field(4096, ge=1, description="real tokens per chunk: bounds the (chunk, V) temporaries")
    output: str = Field("logits", description="student output holding the (B, T, V) next-token logits")


class TokenDistributionLoss(Loss):
    """Mean over real next-token positions of a divergence between the teacher's and student's distributions.

    Subclasses define `divergence(logp, logq)` on paired (n, K) log-probs; `scale_by_t2` multiplies
    it by T² (Hinton: keeps the gradient scale of KL-type terms independent of T).
    """

    Params: ClassVar[type[BaseModel]] = TokenDistParams
    scale_by_t2: ClassVar[bool] = True
    shares_vocab: ClassVar[bool] = True  # teacher ids index the student's vocabulary

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"tokens", "logits"} if params.signal == "dense" else {"tokens", "topk"}

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        """(n, K) teacher, student log-probs -> (n,) per-token values."""
        raise NotImplementedError

    def token_values(self, s: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
        """(n, V) fp32 student logits + n teacher rows -> (n,) per-token loss."""
        logp, logq = paired_logprobs(s, teacher, self.p.temperature)
        value = self.divergence(logp, logq)
        return value * self.p.temperature**2 if self.scale_by_t2 else value

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        logits = student[self.p.output]
        signal = TeacherSignal.from_batch(batch, tid, self.p.signal)
        signal.check(tid, tuple(logits.shape[:2]), logits.shape[-1] if self.shares_vocab else None)
        positions = next_token_positions(batch["attention_mask"].to(logits.device))
        flat = signal.flat()
        total = chunked_token_sum(
            logits, positions, lambda s, rows: self.token_values(s, flat.rows(rows)), self.p.chunk_tokens
        )
        n = positions.numel()
        return total / max(n, 1), {"tokens": torch.tensor(float(n), device=logits.device)}


@LOSSES.register("forward_kl")
class ForwardKLLoss(TokenDistributionLoss):
    """T² · KL(p_T ‖ q_T) per real token: mass-covering token-level KD (the default LLM distillation loss)."""

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return forward_kl_rows(logp, logq)
