"""Pure tensor functions behind the token-level (causal-LM) distillation losses.

Conventions: p is the teacher, q the student, T the temperature. A *sparse* teacher is the top-k
cache: k kept ids plus one tail bucket holding the rest of its mass; the student is then compared
on the same k + 1 buckets (its log-probs at the k ids + its own remaining mass as one bucket), so
student mass outside the teacher's top-k always meets the teacher's tail and is never ignored.
A *dense* teacher has all V logits. Every divergence returns one value per token row, shape (n,).

Memory: the student's logits (B, T, V) are the only full-size tensor; `chunked_token_sum` walks
the real tokens in chunks of (n, V) and computes each chunk's gradient in the same pass (one
log-softmax per token per step), writing it into the single gradient buffer the logits need anyway.
No function here uses fp64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

# Finite stand-in for log 0 on the *teacher* side (an empty tail bucket when k = V, a -inf logit):
# keeps 0 · log 0 terms and their gradients finite. Student log-probs are never clamped, so a
# student at extreme logits still gets a gradient towards the teacher.
LOGP_FLOOR = -1e4

SignalKind = Literal["auto", "topk", "dense"]
TokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- which positions count -------------------------------------------------------------------------


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t counts iff tokens t and t + 1 are both real.

    Position t's distribution predicts token t + 1, so the last real token (nothing left to
    predict) and padding drop out; right and left padding both work.
    attention_mask: (B, T) int or bool, 1 for real tokens.
    """
    am = attention_mask.bool()
    out = torch.zeros_like(am)
    out[:, :-1] = am[:, :-1] & am[:, 1:]
    return out


def next_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) int64 flat positions (b·T + t) of the counted tokens, in order."""
    return next_token_mask(attention_mask).reshape(-1).nonzero().squeeze(1)


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: the token each position predicts (input_ids shifted left; last column 0, never counted)."""
    out = torch.zeros_like(input_ids)
    out[:, :-1] = input_ids[:, 1:]
    return out


# --- the teacher's signal, typed -------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSignal:
    """One teacher's per-token signal: sparse (top-k ids + log-probs + tail) or dense (all logits).

    Tensors are (B, T, ·) as read from the batch, (B·T, ·) after `flat()`, (n, ·) after `rows()`.
    Losses build it with `from_batch` so the cache's column names live in this one class.
    """

    topk_ids: torch.Tensor | None = None  # (..., k) int64 kept vocabulary ids
    topk_logp: torch.Tensor | None = None  # (..., k) fp32 log-probs at T = 1, sorted descending
    tail_logp: torch.Tensor | None = None  # (...,) fp32 log of the mass outside the top-k (-inf when k = V)
    logits: torch.Tensor | None = None  # (..., V) dense logits

    @staticmethod
    def sparse_columns(tid: str) -> tuple[str, str, str]:
        return f"{tid}.topk_ids", f"{tid}.topk_logp", f"{tid}.tail_logp"

    @staticmethod
    def dense_column(tid: str) -> str:
        return f"{tid}.logits"

    @classmethod
    def columns(cls, tid: str, kind: Literal["topk", "dense"]) -> list[str]:
        """The batch columns a sparse (`topk`) or dense teacher signal is read from."""
        return list(cls.sparse_columns(tid)) if kind == "topk" else [cls.dense_column(tid)]

    @staticmethod
    def hidden_column(tid: str, layer: int) -> str:
        return f"{tid}.hidden.{layer}"

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], tid: str, kind: SignalKind = "auto") -> TeacherSignal:
        """Read teacher `tid`'s columns; `auto` takes the top-k cache when present, else dense logits."""
        ids, logp, tail = cls.sparse_columns(tid)
        has_sparse = all(c in batch for c in (ids, logp, tail))
        if kind == "topk" or (kind == "auto" and has_sparse):
            missing = [c for c in (ids, logp, tail) if c not in batch]
            if missing:
                raise KeyError(
                    f"teacher '{tid}': the batch has no top-k column(s) {missing}; "
                    f"teacher columns present: {_teacher_columns(batch, tid)}"
                )
            return cls(topk_ids=batch[ids].long(), topk_logp=batch[logp].float(), tail_logp=batch[tail].float())
        dense = cls.dense_column(tid)
        if dense not in batch:
            raise KeyError(
                f"teacher '{tid}': the batch has neither the top-k columns {[ids, logp, tail]} nor "
                f"'{dense}'; teacher columns present: {_teacher_columns(batch, tid)}"
            )
        return cls(logits=batch[dense])

    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

    @property
    def width(self) -> int:
        """k for a sparse signal, V for a dense one."""
        t = self.topk_ids if self.is_sparse else self.logits
        assert t is not None
        return int(t.shape[-1])

    def flat(self) -> TeacherSignal:
        """(B, T, ·) -> (B·T, ·) views, to index by `next_token_positions`."""
        if self.is_sparse:
            assert self.topk_ids is not None and self.topk_logp is not None and self.tail_logp is not None
            k = self.width
            return TeacherSignal(
                self.topk_ids.reshape(-1, k), self.topk_logp.reshape(-1, k), self.tail_logp.reshape(-1)
            )
        assert self.logits is not None
        return TeacherSignal(logits=self.logits.reshape(-1, self.logits.shape[-1]))

    def rows(self, idx: torch.Tensor) -> TeacherSignal:
        """The n rows `idx` (n,) of a flat signal; dense rows are cast to fp32 here, one chunk at a time."""
        if self.is_sparse:
            assert self.topk_ids is not None and self.topk_logp is not None and self.tail_logp is not None
            return TeacherSignal(
                self.topk_ids.index_select(0, idx),
                self.topk_logp.index_select(0, idx),
                self.tail_logp.index_select(0, idx),
            )
        assert self.logits is not None
        return TeacherSignal(logits=self.logits.index_select(0, idx).float())

    def check(self, tid: str, seq_shape: tuple[int, int], student_vocab: int | None) -> None:
        """Fail with a message naming the mismatch (sequence shape; vocabulary when it must be shared).

        A vocabulary mismatch (e.g. an embedding padded to 152,064 rows against 151,936 ids) is the
        most common distillation bug; it must not surface as an index error deep in a gather.
        """
        lead = self.topk_ids if self.is_sparse else self.logits
        assert lead is not None
        if tuple(lead.shape[:2]) != tuple(seq_shape):
            raise ValueError(
                f"teacher '{tid}' signal covers {tuple(lead.shape[:2])} (B, T) positions but the student's "
                f"logits cover {tuple(seq_shape)}"
            )
        if student_vocab is None:
            return
        if self.is_sparse:
            assert self.topk_ids is not None and self.tail_logp is not None
            if tuple(self.tail_logp.shape) != tuple(seq_shape):
                raise ValueError(
                    f"teacher '{tid}' tail_logp has shape {tuple(self.tail_logp.shape)}, expected {tuple(seq_shape)}"
                )
            if self.width > student_vocab:
                raise ValueError(
                    f"teacher '{tid}' keeps k = {self.width} ids but the student's vocabulary has {student_vocab}"
                )
            if not self.topk_ids.numel():
                return
            lo, hi = int(self.topk_ids.min()), int(self.topk_ids.max())  # one host sync per loss and step
            if lo < 0 or hi >= student_vocab:
                raise ValueError(
                    f"teacher '{tid}' top-k ids span [{lo}, {hi}] (reach {hi}) but the student's vocabulary "
                    f"has {student_vocab} ids: the two models must share a vocabulary (use `uld` across "
                    "tokenizers)"
                )
        elif self.width != student_vocab:
            raise ValueError(
                f"teacher '{tid}' logits have V = {self.width} but the student's have V = {student_vocab}: "
                "the two models must share a vocabulary (use `uld` across tokenizers)"
            )


def _teacher_columns(batch: Mapping[str, Any], tid: str) -> list[str]:
    return sorted(k for k in batch if k.startswith(f"{tid}."))


# --- log-probs on the shared buckets ---------------------------------------------------------------


def sparse_teacher_logprobs(
    topk_logp: torch.Tensor, tail_logp: torch.Tensor, vocab: int, temperature: float
) -> torch.Tensor:
    """(n, k + 1) fp32 teacher log-probs at temperature T over the k kept ids + one tail bucket.

    topk_logp (n, k), tail_logp (n,): the cache at T = 1. Dividing log-probs by T equals dividing
    logits by T after renormalising; the tail's V − k ids are taken as equal (the cache does not
    know them), so the tail at T is log(V − k) + (tail − log(V − k)) / T — exact at T = 1 and when
    k = V (empty tail). Renormalising also absorbs quantisation drift of the decoded cache.
    Floored at LOGP_FLOOR so an empty tail is finite.
    """
    T = temperature
    k = topk_logp.shape[-1]
    z = topk_logp.float() / T
    tail = tail_logp.float()
    if k >= vocab:
        tail = torch.full_like(tail, float("-inf"))
    elif T != 1.0:
        n_tail = math.log(vocab - k)
        tail = n_tail + (tail - n_tail) / T
    return F.log_softmax(torch.cat([z, tail[:, None]], dim=1), dim=1).clamp(min=LOGP_FLOOR)


def student_bucket_logprobs(s: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, k + 1) fp32 student log-probs at the teacher's k ids + its own remaining mass.

    s (n, V) student logits, ids (n, k) int64 distinct ids. The remaining mass is a log-sum-exp
    over the other ids (exact even when the kept mass is ≈ 1, where log(1 − Σ) would cancel).
    When k = V the remaining bucket is empty: the constant LOGP_FLOOR, which carries no gradient.
    """
    logq = dense_logprobs(s, temperature)
    kept = logq.gather(1, ids)
    if ids.shape[1] >= s.shape[1]:
        rest = torch.full_like(kept[:, 0], LOGP_FLOOR)
    else:
        rest = logq.scatter(1, ids, float("-inf")).logsumexp(dim=1)
    return torch.cat([kept, rest[:, None]], dim=1)


def dense_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, V) fp32 log-softmax(logits / T); skips the (n, V) division at T = 1."""
    z = logits.float()
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=1)


def paired_logprobs(s: torch.Tensor, teacher: TeacherSignal, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, logq), both (n, K): teacher and student on the same K = k + 1 buckets (sparse) or V ids (dense).

    s (n, V) student logits; teacher: n rows of a `TeacherSignal`. The teacher side is floored at
    LOGP_FLOOR (finite everywhere); the student side is exact.
    """
    if teacher.is_sparse:
        assert teacher.topk_ids is not None and teacher.topk_logp is not None and teacher.tail_logp is not None
        logp = sparse_teacher_logprobs(teacher.topk_logp, teacher.tail_logp, s.shape[1], temperature)
        return logp, student_bucket_logprobs(s, teacher.topk_ids, temperature)
    assert teacher.logits is not None
    return dense_logprobs(teacher.logits, temperature).clamp(min=LOGP_FLOOR), dense_logprobs(s, temperature)


# --- per-token divergences on paired log-probs (all (n, K) -> (n,)) -------------------------------


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q) per row. Inputs must be finite (see LOGP_FLOOR)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def forward_kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q): mass-covering (Hinton KD)."""
    return kl_rows(logp, logq)


def reverse_kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p): mode-seeking (MiniLLM); on buckets, student mass off the teacher's top-k meets its tail."""
    return kl_rows(logq, logp)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) for 0 < w < 1, without leaving log space."""
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def jsd_rows(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q (GKD, TRL's convention).

    The formula vanishes at both ends; like TRL, β = 0 is defined as forward KL(p ‖ q) and β = 1 as
    reverse KL(q ‖ p), which are its limits after dividing by β, resp. 1 − β.
    """
    if beta == 0.0:
        return forward_kl_rows(logp, logq)
    if beta == 1.0:
        return reverse_kl_rows(logp, logq)
    logm = _log_mix(logp, logq, beta)
    return beta * kl_rows(logp, logm) + (1.0 - beta) * kl_rows(logq, logm)


def skew_kl_rows(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL(α) = KL(p ‖ α·p + (1 − α)·q) (DistiLLM): bounded by log(1/α), so stable early on. α = 0 is KL(p ‖ q)."""
    if alpha == 0.0:
        return kl_rows(logp, logq)
    return kl_rows(logp, _log_mix(logp, logq, alpha))


def tvd_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ |p − q|, in [0, 1]."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(dim=-1)


# --- ULD: sorted probabilities, no shared vocabulary -----------------------------------------------


def sorted_l1_rows(p_sorted: torch.Tensor, q_sorted: torch.Tensor) -> torch.Tensor:
    """Σ_i |p_(i) − q_(i)| per row; p_sorted (n, a), q_sorted (n, b) descending, the shorter padded with 0."""
    a, b = p_sorted.shape[1], q_sorted.shape[1]
    if a < b:
        p_sorted = F.pad(p_sorted, (0, b - a))
    elif b < a:
        q_sorted = F.pad(q_sorted, (0, a - b))
    return (p_sorted - q_sorted).abs().sum(dim=-1)


def sorted_probs(logits: torch.Tensor, temperature: float, k: int | None) -> torch.Tensor:
    """(n, min(k, V)) fp32 descending probabilities softmax(logits / T), the top k (all when k is None)."""
    p = F.softmax(logits.float() / temperature, dim=1)
    if k is None or k >= p.shape[1]:
        return p.sort(dim=1, descending=True).values
    return p.topk(k, dim=1).values


def sparse_sorted_probs(
    topk_logp: torch.Tensor, tail_logp: torch.Tensor, vocab: int, temperature: float, k: int | None
) -> torch.Tensor:
    """(n, k') fp32 descending teacher probabilities at T of the cached top-k (k' = min(k, cached k)).

    topk_logp (n, k), tail_logp (n,); `vocab` is the teacher's vocabulary size, used only to
    spread the tail at T ≠ 1 (see `sparse_teacher_logprobs`). The tail bucket is not a token and
    is left out of the sorted vector.
    """
    p = sparse_teacher_logprobs(topk_logp, tail_logp, vocab, temperature)[:, :-1].exp()
    p = p.sort(dim=1, descending=True).values
    return p if k is None else p[:, :k]


# --- data cross-entropy and hidden states --------------------------------------------------------


def next_token_ce_rows(s: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) cross-entropy −log softmax(s)[target]; s (n, V) logits, targets (n,) int64 ids."""
    s = s.float()
    return s.logsumexp(dim=1) - s.gather(1, targets[:, None]).squeeze(1)


def hidden_mse(h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_real ‖h − t‖² / (real tokens · H): mean squared error per hidden unit over real tokens.

    h, t (B, T, H) fp32; mask (B, T) bool. 0 with a graph when no token is real.
    """
    d = (h - t)[mask]
    return (d * d).sum() / max(d.numel(), 1)


def hidden_cosine(h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of 1 − cos(h, t): matches direction only, indifferent to scale.

    h, t (B, T, H) fp32; mask (B, T) bool; the eps keeps zero vectors' gradients finite.
    """
    cos = F.cosine_similarity(h[mask], t[mask], dim=-1, eps=1e-8)
    return (1.0 - cos).sum() / max(cos.numel(), 1)


# --- the chunked driver ----------------------------------------------------------------------------


def chunked_token_sum(logits: torch.Tensor, positions: torch.Tensor, fn: TokenFn, chunk_tokens: int) -> torch.Tensor:
    """Σ over the `positions` of fn(student rows, positions): a 0-dim fp32 tensor, differentiable in `logits`.

    logits (B, T, V) any float dtype; positions (N,) int64 flat indices b·T + t; fn maps
    (n, V) fp32 student logits and their (n,) positions to (n,) per-token losses, reading the teacher
    rows it needs by position. At most `chunk_tokens` rows are live at once, and each chunk's
    gradient is computed in the same pass into one buffer shaped like `logits` (needed anyway as
    their gradient) — so the log-softmax runs once per token per step and the autograd graph holds
    no (N, V) intermediates. The teacher is treated as a constant.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if logits.requires_grad and torch.is_grad_enabled():
        return _ChunkedTokenSum.apply(logits, positions, fn, chunk_tokens)
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, positions.numel(), chunk_tokens):
            rows = positions[start : start + chunk_tokens]
            total += fn(flat.index_select(0, rows).float(), rows).sum()
        return total


class _ChunkedTokenSum(torch.autograd.Function):
    """Forward computes value and gradient chunk by chunk; backward only scales the stored gradient."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, positions: torch.Tensor, fn: TokenFn, chunk_tokens: int
    ) -> torch.Tensor:
        flat = logits.detach().reshape(-1, logits.shape[-1])
        grad = torch.zeros_like(flat)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, positions.numel(), chunk_tokens):
            rows = positions[start : start + chunk_tokens]
            with torch.enable_grad():
                s = flat.index_select(0, rows).float().requires_grad_(True)
                part = fn(s, rows).sum()
                (g,) = torch.autograd.grad(part, s)
            grad.index_copy_(0, rows, g.to(grad.dtype))
            total += part.detach()
        ctx.grad = grad.view_as(logits)
        ctx.used = False
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if ctx.used:
            raise RuntimeError(
                "a chunked token loss stores its gradient from the forward pass and scales it in place: "
                "backward through it runs once (do not use retain_graph=True with a second backward)"
            )
        ctx.used = True
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None
