"""Pure tensor functions behind the losses (unit-tested against hand-computed values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG = -1e4  # finite stand-in for log(0) so 0·log 0 terms have clean gradients


def kd_dense(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)), averaged over rows."""
    T = temperature
    logq = F.log_softmax(s / T, dim=1)
    logp = F.log_softmax(t.float() / T, dim=1)
    return F.kl_div(logq, logp, log_target=True, reduction="batchmean") * T * T


def topk_teacher_logprobs(
    idx: torch.Tensor, val: torch.Tensor, tail_lse: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Teacher log-probs over k kept classes + one tail bucket, at temperature T.

    The tail's k..C logits are reconstructed as (C-k) equal logits with the stored
    log-sum-exp, which is exact at T = 1 and for k = C (empty tail).
    """
    T = temperature
    k = idx.shape[1]
    z = val.float() / T
    if k < num_classes:
        n_tail = num_classes - k
        tail = math.log(n_tail) + (tail_lse.float() - math.log(n_tail)) / T
    else:
        tail = torch.full_like(tail_lse.float(), float("-inf"))
    return F.log_softmax(torch.cat([z, tail[:, None]], dim=1), dim=1)


def student_bucket_logprobs(s: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probs at the teacher's top-k indices + its own remaining mass."""
    logq = F.log_softmax(s / temperature, dim=1)
    kept = logq.gather(1, idx.long())
    mask = torch.ones_like(logq, dtype=torch.bool).scatter(1, idx.long(), False)
    rest = torch.where(mask, logq, torch.full_like(logq, float("-inf"))).logsumexp(dim=1)
    return torch.cat([kept, rest[:, None]], dim=1).clamp(min=NEG)


def kd_topk(
    s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, tail_lse: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL over the k+1 buckets; equals `kd_dense` when k covers every class."""
    logp = topk_teacher_logprobs(idx, val, tail_lse, s.shape[1], temperature)
    logq = student_bucket_logprobs(s, idx, temperature)
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp.clamp(min=NEG) - logq), torch.zeros_like(p)).sum(dim=1)
    return kl.mean() * temperature * temperature


def dense_from_topk(idx: torch.Tensor, val: torch.Tensor, tail_lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits rebuilt from a top-k row (tail spread uniformly): for fusion and fidelity checks."""
    k = idx.shape[1]
    out = torch.empty(idx.shape[0], num_classes, dtype=torch.float32, device=idx.device)
    if k < num_classes:
        fill = (tail_lse.float() - math.log(num_classes - k))[:, None]
        out[:] = fill
    out.scatter_(1, idx.long(), val.float())
    return out


def masked_ce(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a label (label >= 0); 0 (with a graph) when none has one."""
    mask = labels >= 0
    if not bool(mask.any()):
        return s.sum() * 0.0
    return F.cross_entropy(s[mask], labels[mask].long())
