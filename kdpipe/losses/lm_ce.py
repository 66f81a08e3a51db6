"""Next-token cross-entropy on the data for causal LMs (the hard-label term beside a KD term).

Position t predicts input_ids[t + 1]; it counts only when tokens t and t + 1 are both real. Chunked
over tokens like the KD losses, so it adds no (B, T, V) intermediate.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.lm.token_functional import chunked_token_sum, next_token_ce_rows, next_token_positions, next_token_targets
from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss


class LMCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunk_tokens: int = Field(4096, ge=1, description="real tokens per chunk: bounds the (chunk, V) temporaries")
    output: str = Field("logits", description="student output holding the (B, T, V) next-token logits")


@LOSSES.register("lm_ce")
class LMCELoss(Loss):
    """Mean over real next-token positions of −log q(input_ids[t + 1] | ≤ t)."""

    Params = LMCEParams

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = student[self.p.output]
        ids = batch["input_ids"].to(logits.device)
        if tuple(ids.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"lm_ce: input_ids {tuple(ids.shape)} vs logits {tuple(logits.shape[:2])} (B, T)")
        positions = next_token_positions(batch["attention_mask"].to(logits.device))
        targets = next_token_targets(ids.long()).reshape(-1)
        if positions.numel() and int(targets[positions].max()) >= logits.shape[-1]:
            raise ValueError(
                f"lm_ce: token id {int(targets[positions].max())} is outside the student's vocabulary "
                f"({logits.shape[-1]} ids)"
            )
        total = chunked_token_sum(
            logits, positions, lambda s, rows: next_token_ce_rows(s, targets.index_select(0, rows)), self.p.chunk_tokens
        )
        n = positions.numel()
        return total / max(n, 1), {"tokens": torch.tensor(float(n), device=logits.device)}
