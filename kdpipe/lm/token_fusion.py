"""Token-level logit fusion of causal-LM teachers that share a tokenizer, on their cached top-k.

Each teacher's cache holds, per token, its top-k log-probs and the log of the mass outside them
(the tail). Fusion works on the union U of the members' top-k ids at that token, plus one "rest"
bucket standing for the V − |U| ids no member ranked:

- a member's log-prob of an id in its own top-k is cached; of any other id it is taken as its tail
  spread evenly over the V − k ids outside its top-k: ``tail_i − log(V − k)`` (the only unbiased
  guess the cache allows);
- every rest id then has the same log-prob under a member, so the rest bucket's "logit" is that
  log-prob + ``log(V − |U|)``. With weights on the simplex, ``Σ_i w_i z_i`` over the buckets gives
  exactly the bucketed version of the per-id fusion ``softmax(Σ_i w_i log p_i)`` over V (the
  ``log(V − |U|)`` term passes through the weighted sum unchanged).

The fused distribution over U + rest is then `kdpipe.fusion.fuse` (uniform, static or dynamic
weights per token, the same objective as the classifier fusion), and is written back as a top-k +
tail: its k most likely ids of U, and the tail = everything else (the rest of U and the bucket).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kdpipe.fusion import DEFAULT_SHARPNESS, fuse
from kdpipe.lm.topk_codec import TopKBatch

_PAD = -1e4  # log-prob of a padded slot of U (exp underflows to 0; keeps the KL terms finite)


def union_logprobs(members: Sequence[TopKBatch], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per real token: the union ids (M, S) (S = n·k, padded with -1) and each member's log-probs on
    them plus the rest bucket, (n, M, S + 1). M = real tokens of the batch (mask of member 0)."""
    mask = members[0].mask
    for m in members[1:]:
        if m.mask.shape != mask.shape or (m.mask != mask).any():
            raise ValueError(
                "token fusion: the member caches hold different tokens for the same rows (different "
                "tokenizers or max_length?); fuse teachers that share a tokenizer and `max_length`"
            )
    ids = [m.ids[mask].astype(np.int64) for m in members]  # (M, k_i)
    logp = [m.logp[mask].astype(np.float64) for m in members]
    tail = [m.tail_logp[mask].astype(np.float64) for m in members]
    n_tok = len(ids[0])
    # the union per token, vectorised: sort the members' ids, push repeats past the end (as `vocab`)
    srt = np.sort(np.concatenate(ids, axis=1), axis=1)
    s = srt.shape[1]
    srt[:, 1:][srt[:, 1:] == srt[:, :-1]] = vocab
    srt = np.sort(srt, axis=1)
    size = (srt < vocab).sum(1)
    # each cached id's slot in its token's union: one searchsorted over row-offset keys
    row = np.arange(n_tok)[:, None]
    keys = (row * (vocab + 1) + srt).ravel()
    z = np.full((len(members), n_tok, s + 1), _PAD)
    for j, (i, lp, tl) in enumerate(zip(ids, logp, tail)):
        k = i.shape[1]
        spread = tl - math.log(vocab - k) if vocab > k else np.full(n_tok, -np.inf)  # per id outside its top-k
        z[j, :, :s] = np.where(srt < vocab, spread[:, None], _PAD)
        slot = np.searchsorted(keys, (row * (vocab + 1) + i).ravel()).reshape(n_tok, k) - row * s
        np.put_along_axis(z[j, :, :s], slot, lp, axis=1)
        rest = vocab - size
        z[j, :, s] = np.where(rest > 0, spread + np.log(np.maximum(rest, 1)), _PAD)
    union = np.where(srt < vocab, srt, -1)
    return union, np.maximum(z, _PAD)


def fuse_topk(
    members: Sequence[TopKBatch],
    vocab: int,
    k: int,
    mode: str,
    weights: Sequence[float] | None = None,
    steps: int = 50,
    sharpness: float = DEFAULT_SHARPNESS,
    temperature: float = 1.0,
) -> tuple[TopKBatch, np.ndarray]:
    """Fuse the members' top-k per token; returns the fused top-k + tail as a `TopKBatch` (same
    padding and mask as the members) and the per-token weights (B, T, n) (0 at padding).
    `temperature` only shapes the dynamic objective; the fused distribution is Σ_i w_i log p_i."""
    mask = members[0].mask
    union, z = union_logprobs(members, vocab)
    fused, w = fuse([torch.from_numpy(x).float() for x in z], mode, weights, temperature, steps, sharpness)
    lq = torch.log_softmax(fused.double(), dim=-1)  # (M, S + 1)
    in_u = torch.from_numpy(union >= 0)
    cand = lq[:, :-1].masked_fill(~in_u, -math.inf)
    kk = min(k, cand.shape[1])
    vals, slot = torch.topk(cand, kk, dim=-1)
    top_ids = torch.gather(torch.from_numpy(union), 1, slot)
    rest = lq.clone()
    rest[:, :-1] = cand.scatter(1, slot, -math.inf)
    tail = torch.logsumexp(rest, dim=-1)
    b, t = mask.shape
    out = TopKBatch(
        np.zeros((b, t, kk), np.int64),
        np.full((b, t, kk), -np.inf, np.float32),
        np.zeros((b, t), np.float32),
        mask.copy(),
    )
    out.ids[mask] = np.where(np.isfinite(vals.numpy()), top_ids.numpy(), 0)
    out.logp[mask] = vals.numpy().astype(np.float32)
    out.tail_logp[mask] = tail.numpy().astype(np.float32)
    wt = np.zeros((b, t, len(members)), np.float32)
    wt[mask] = w.numpy()
    return out, wt
