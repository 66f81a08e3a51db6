"""Generalised Jensen-Shannon divergence per token (GKD, Agarwal et al. 2024), TRL's β convention.

JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with m = β·p + (1 − β)·q; β = 0 is forward KL(p ‖ q) and
β = 1 reverse KL(q ‖ p), as in TRL's `generalized_jsd_loss`; values in between interpolate.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdpipe.lm.token_functional import jsd_rows
from kdpipe.losses import LOSSES
from kdpipe.losses.token_kl import TokenDistParams, TokenDistributionLoss


class JSDParams(TokenDistParams):
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the teacher in the mixture m = β·p + (1 − β)·q; 0 = forward KL, 1 = reverse KL",
    )


@LOSSES.register("jsd")
class JSDLoss(TokenDistributionLoss):
    """T² · JSD(β)(p_T, q_T) per real token."""

    Params = JSDParams

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return jsd_rows(logp, logq, self.p.beta)
