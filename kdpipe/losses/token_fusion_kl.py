"""Train-time token-level logit fusion: two or more causal-LM teachers that share a tokenizer are
fused per token in every batch, from their cached top-k (uniform, static or dynamic weights; the
union-plus-rest construction of `kdpipe.lm.token_fusion`), and the student learns the fused top-k
+ tail with forward KL.

`teach.fusion` writes the same fused distribution once, as a cache of its own; fusing at train time
instead lets the weights, the mode or the set of teachers change between runs over the same member
caches, without teaching again.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdpipe.fusion import FusionLossParams
from kdpipe.lm.token_functional import TeacherSignal
from kdpipe.lm.token_fusion import fuse_topk
from kdpipe.lm.topk_codec import TopKBatch
from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss, LossContext
from kdpipe.losses.token_kl import ForwardKLLoss, TokenDistParams

FUSED = "fused@train"  # the batch key prefix the fused signal travels under, for the KL it feeds


class TokenFusionParams(FusionLossParams):
    teachers: list[str] = Field(min_length=2, description="teacher ids whose cached top-k are fused per token")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KL (teacher and student)")
    chunk_tokens: int = Field(4096, ge=1, description="real tokens per chunk: bounds the (chunk, V) temporaries")
    output: str = Field("logits", description="student output holding the (B, T, V) next-token logits")


@LOSSES.register("token_fusion_kl")
class TokenFusionKLLoss(Loss):
    Params = TokenFusionParams

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"tokens", "topk"}

    def __init__(self, params: TokenFusionParams, ctx: LossContext) -> None:
        super().__init__(params, ctx)
        unknown = [t for t in params.teachers if ctx.teachers and t not in ctx.teachers]
        if unknown:
            raise ValueError(f"token_fusion_kl: unknown teacher(s) {unknown}; the spec's teachers are {ctx.teachers}")
        kl = TokenDistParams(
            teacher=FUSED,
            temperature=params.temperature,
            signal="topk",
            chunk_tokens=params.chunk_tokens,
            output=params.output,
        )
        self.kl = ForwardKLLoss(kl, LossContext(ctx.num_classes, [FUSED], ctx.widths))

    def forward(
        self, student: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:

        logits = student[self.p.output]
        self._check_same_tokens(batch)
        mask = batch["attention_mask"].bool().cpu().numpy()
        members = []
        for tid in self.p.teachers:
            sig = TeacherSignal.from_batch(batch, tid, "topk")
            assert sig.topk_ids is not None and sig.topk_logp is not None and sig.tail_logp is not None
            members.append(
                TopKBatch(sig.topk_ids.cpu().numpy(), sig.topk_logp.cpu().numpy(), sig.tail_logp.cpu().numpy(), mask)
            )
        k = max(m.ids.shape[-1] for m in members)
        fused, w = fuse_topk(
            members,
            int(logits.shape[-1]),
            k,
            self.p.mode,
            self.p.weights,
            self.p.steps,
            self.p.sharpness,
            self.p.fusion_temperature,
        )
        ids, logp, tail = TeacherSignal.sparse_columns(FUSED)
        dev = logits.device
        loss, parts = self.kl(
            student,
            {
                **batch,
                ids: torch.from_numpy(fused.ids).to(dev),
                logp: torch.from_numpy(fused.logp).to(dev),
                tail: torch.from_numpy(fused.tail_logp).to(dev),
            },
        )
        real = max(int(mask.sum()), 1)
        for i, tid in enumerate(self.p.teachers):  # each teacher's mean weight over the batch's real tokens
            parts[f"w_{tid}"] = torch.tensor(float(w[..., i][mask].sum()) / real, device=dev)
        return loss, parts

    def _check_same_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        first = self.p.teachers[0]
        for tid in self.p.teachers[1:]:
            a, b = batch.get(f"{first}.input_ids"), batch.get(f"{tid}.input_ids")
            if a is not None and b is not None and not torch.equal(a, b):
                raise ValueError(
                    f"token_fusion_kl: teachers '{first}' and '{tid}' tokenised the same rows differently; "
                    "fuse teachers that share a tokenizer and `max_length`"
                )
