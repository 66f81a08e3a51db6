"""Total variation distance per token: ½ Σ |p − q| over the buckets (sparse) or the vocabulary (dense).

Bounded in [0, 1] and symmetric; not scaled by T² (it is not a KL, and its gradient does not
shrink as 1/T² the way KL's does).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kdpipe.lm.token_functional import tvd_rows
from kdpipe.losses import LOSSES
from kdpipe.losses.token_kl import TokenDistributionLoss


@LOSSES.register("tvd")
class TVDLoss(TokenDistributionLoss):
    """½ Σ |p_T − q_T| per real token."""

    scale_by_t2: ClassVar[bool] = False

    def divergence(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return tvd_rows(logp, logq)
