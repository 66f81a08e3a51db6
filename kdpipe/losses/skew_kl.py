"""Skew KL per token (DistiLLM, Ko et al. 2024): KL against a mixture, bounded and so more stable.

skew forward KL(α) = KL(p ‖ α·p + (1 − α)·q); with ``reverse: true`` the skew reverse KL
KL(q ‖ α·q + (1 − α)·p). α = 0 is plain KL; the value is at most log(1/α).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdpipe.lm.token_functional import skew_kl_rows
from kdpipe.losses import LOSSES
from kdpipe.losses.token_kl import TokenDistParams, TokenDistributionLoss


class SkewKLParams(TokenDistParams):
    alpha: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="skew α: share of the first argument in the mixture "
        "(0 = plain KL; 1 would make the loss identically 0)",
    )
    reverse: bool = Field(False, description="skew reverse KL(q ‖ α·q + (1 − α)·p) instead of the forward one")


@LOSSES.register("skew_kl")
class SkewKLLoss(TokenDistributionLoss):
    """T² · skew KL(α) per real token."""

    Params = SkewKLParams

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        if self.p.reverse:
            return skew_kl_rows(logq, logp, self.p.alpha)
        return skew_kl_rows(logp, logq, self.p.alpha)
