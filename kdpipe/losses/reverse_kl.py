"""Reverse KL per token (MiniLLM): mode-seeking, the student is pushed off what the teacher rules out.

On the top-k cache the student's mass outside the teacher's k ids is one bucket compared with the
teacher's tail bucket, so it is penalised rather than silently dropped.
"""

from __future__ import annotations

import torch

from kdpipe.lm.token_functional import reverse_kl_rows
from kdpipe.losses import LOSSES
from kdpipe.losses.token_kl import TokenDistributionLoss


@LOSSES.register("reverse_kl")
class ReverseKLLoss(TokenDistributionLoss):
    """T² · KL(q_T ‖ p_T) per real token."""

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return reverse_kl_rows(logp, logq)
