"""The `lm` evaluator (``evaluate.task: lm``): held-out next-token metrics of a causal-LM student,
and of its teacher from the cache, over real tokens only (the same mask as the token losses).

Metrics (each under ``prefix``), from per-batch sums over the whole split:
  nll, ppl                 mean next-token negative log-likelihood of the data, and exp of it
  token_acc                student's top-1 next token == the data's next token
  teacher_agreement        student's top-1 == the teacher's top-1 (from the cached top-k)
  kl                       KL(teacher ‖ student) per token on the cached k + 1 buckets, at T = 1
  teacher_ppl              the teacher's perplexity of the data from its cache: exact where the next
                           token is in the cached top-k, the tail spread uniformly over the rest otherwise
  teacher_token_acc        the teacher's top-1 == the data's next token
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.evaluators import EVALUATORS
from kdpipe.evaluators.base import Evaluator
from kdpipe.lm.token_functional import (
    TeacherSignal,
    forward_kl_rows,
    next_token_positions,
    next_token_targets,
    paired_logprobs,
)


def _teacher_ids(batch: dict[str, torch.Tensor]) -> list[str]:
    """The batch's token teachers, the reference one first: the fused teacher when there is one
    (what a fusion student learns from), else the first by id."""
    cands = sorted(k.removesuffix(".topk_ids") for k in batch if k.endswith(".topk_ids"))
    return sorted(cands, key=lambda t: t != "fused")


@EVALUATORS.register("lm")
class LMEvaluator(Evaluator):
    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = model(batch)["logits"]
        v = logits.shape[-1]
        pos = next_token_positions(batch["attention_mask"])
        targets = next_token_targets(batch["input_ids"].long()).reshape(-1).index_select(0, pos)
        s = logits.reshape(-1, v).index_select(0, pos).float()
        logq = F.log_softmax(s, dim=1)
        top1 = s.argmax(1)
        sums = {
            "tokens": float(len(pos)),
            "nll": float(-logq.gather(1, targets[:, None]).sum()),
            "correct": float((top1 == targets).sum()),
        }
        tids = _teacher_ids(batch)
        for i, tid in enumerate(tids):  # the reference teacher; then each other one on its own (fusion members)
            sig = TeacherSignal.from_batch(batch, tid, "topk").flat().rows(pos)
            name = "teacher" if i == 0 else f"teacher_{tid}"
            sums[f"{name}_correct"] = float((sig.topk_ids[:, 0] == targets).sum())
            sums[f"{name}_nll"] = float(-_teacher_logprob(sig, targets, v).sum())
            if i == 0:
                logp, lq = paired_logprobs(s, sig, 1.0)
                sums["kl"] = float(forward_kl_rows(logp, lq).sum())
                sums["agree"] = float((top1 == sig.topk_ids[:, 0]).sum())
        return sums

    def finish(self, sums: dict[str, float], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        n = sums.get("tokens", 0.0)
        if not n:
            return {f"{prefix}nll": float("nan")}
        out = {
            f"{prefix}nll": sums["nll"] / n,
            f"{prefix}ppl": math.exp(sums["nll"] / n),
            f"{prefix}token_acc": sums["correct"] / n,
        }
        if "kl" in sums:
            out.update(
                {
                    f"{prefix}kl": sums["kl"] / n,
                    f"{prefix}teacher_agreement": sums["agree"] / n,
                    f"{prefix}teacher_ppl": math.exp(sums["teacher_nll"] / n),
                    f"{prefix}teacher_token_acc": sums["teacher_correct"] / n,
                }
            )
        for k in sums:
            if k.startswith("teacher_") and k.endswith("_nll") and k != "teacher_nll":
                tid = k.removeprefix("teacher_").removesuffix("_nll")
                out[f"{prefix}teacher_{tid}_ppl"] = math.exp(sums[k] / n)
                out[f"{prefix}teacher_{tid}_token_acc"] = sums[f"teacher_{tid}_correct"] / n
        return out


def _teacher_logprob(sig: TeacherSignal, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n,) the teacher's log-prob of each target from its cached top-k + tail bucket."""
    assert sig.topk_ids is not None and sig.topk_logp is not None and sig.tail_logp is not None
    hit = sig.topk_ids == targets[:, None]
    kept = sig.topk_logp.gather(1, hit.float().argmax(1, keepdim=True)).squeeze(1)
    rest = max(vocab - sig.topk_ids.shape[1], 1)
    return torch.where(hit.any(1), kept, sig.tail_logp - math.log(rest))
