"""Token-level fusion of causal-LM teachers' cached top-k (kdpipe.lm.token_fusion)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdpipe.lm.token_fusion import fuse_topk, union_logprobs
from kdpipe.lm.topk_codec import TopKBatch


def _batch(ids, probs, tails, pad: int = 0) -> TopKBatch:
    """One row of T real tokens (+ `pad` padding) from per-token top-k ids/probs and tail masses."""
    ids, probs = np.asarray(ids), np.asarray(probs, dtype=np.float64)
    t, k = ids.shape
    b = TopKBatch(
        np.zeros((1, t + pad, k), np.int64),
        np.full((1, t + pad, k), -np.inf, np.float32),
        np.zeros((1, t + pad), np.float32),
        np.zeros((1, t + pad), bool),
    )
    b.ids[0, :t], b.logp[0, :t] = ids, np.log(probs)
    b.tail_logp[0, :t], b.mask[0, :t] = np.log(np.asarray(tails, dtype=np.float64)), True
    return b


def _dense(b: TopKBatch, vocab: int) -> np.ndarray:
    """The member's distribution over all V ids, its tail spread evenly outside its top-k: (T, V)."""
    m = b.mask[0]
    ids, lp, tl = b.ids[0][m], b.logp[0][m].astype(np.float64), b.tail_logp[0][m].astype(np.float64)
    k = ids.shape[1]
    p = np.repeat((np.exp(tl) / (vocab - k))[:, None], vocab, axis=1)
    np.put_along_axis(p, ids, np.exp(lp), axis=1)
    return p


def test_uniform_fusion_by_hand() -> None:
    """V = 6, k = 2. A: {0: .5, 1: .3}, tail .2 (.05 per other id); B: {1: .6, 2: .2}, tail .2.
    Uniform fusion = normalised geometric mean: 0 -> √(.5·.05), 1 -> √(.3·.6), 2 -> √(.05·.2),
    each of the 3 ids nobody ranked -> √(.05·.05)."""
    a = _batch([[0, 1]], [[0.5, 0.3]], [0.2])
    b = _batch([[1, 2]], [[0.6, 0.2]], [0.2])
    g = np.array([math.sqrt(0.5 * 0.05), math.sqrt(0.3 * 0.6), math.sqrt(0.05 * 0.2)])
    z = g.sum() + 3 * 0.05
    fused, w = fuse_topk([a, b], vocab=6, k=2, mode="uniform")
    assert fused.ids[0, 0].tolist() == [1, 0]
    np.testing.assert_allclose(np.exp(fused.logp[0, 0]), [g[1] / z, g[0] / z], rtol=1e-5)
    np.testing.assert_allclose(np.exp(fused.tail_logp[0, 0]), (g[2] + 3 * 0.05) / z, rtol=1e-5)
    np.testing.assert_allclose(w[0, 0], [0.5, 0.5])


def test_bucketed_fusion_equals_fusion_over_the_whole_vocabulary() -> None:
    """Random members (k = 3 of V = 11, 5 tokens + padding): the fused top-k and tail equal the
    per-id fusion softmax(Σ w_i log p_i) computed densely over all V ids, for static weights."""
    rng = np.random.default_rng(0)
    vocab, k, t = 11, 3, 5
    members = []
    for _ in range(3):
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
        p = rng.dirichlet(np.ones(k + 1), size=t)
        members.append(_batch(ids, p[:, :k], p[:, k], pad=2))
    wts = [0.5, 0.3, 0.2]
    fused, _ = fuse_topk(members, vocab, k=4, mode="static", weights=wts)
    logq = sum(w * np.log(_dense(m, vocab)) for w, m in zip(wts, members))
    q = np.exp(logq - logq.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert not fused.mask[0, t:].any()
    for r in range(t):
        top = np.argsort(-q[r], kind="stable")[:4]
        got = np.exp(fused.logp[0, r].astype(np.float64))
        np.testing.assert_allclose(got, q[r, top], rtol=1e-5)
        np.testing.assert_allclose(np.exp(float(fused.tail_logp[0, r])), 1 - q[r, top].sum(), rtol=1e-4, atol=1e-7)
        # ids: the same set up to ties between equal probabilities (a rest id and an unranked union id)
        assert np.allclose(np.sort(q[r, fused.ids[0, r]]), np.sort(q[r, top]), rtol=1e-5)


def test_static_weight_on_one_member_gives_back_that_member() -> None:
    a = _batch([[0, 1], [2, 3]], [[0.5, 0.3], [0.7, 0.1]], [0.2, 0.2])
    b = _batch([[4, 5], [0, 1]], [[0.9, 0.05], [0.6, 0.3]], [0.05, 0.1])
    fused, _ = fuse_topk([a, b], vocab=8, k=2, mode="static", weights=[1.0, 0.0])
    assert (fused.ids[0] == a.ids[0]).all()
    np.testing.assert_allclose(fused.logp[0], a.logp[0], atol=1e-5)
    np.testing.assert_allclose(fused.tail_logp[0], a.tail_logp[0], atol=1e-5)


def test_dynamic_fusion_weights_are_per_token_on_the_simplex_and_never_worse_than_uniform() -> None:
    from kdpipe.fusion import fusion_objective

    rng = np.random.default_rng(1)
    vocab, k, t = 50, 4, 8
    members = []
    for sharp in (0.2, 5.0):  # a flat and a decided teacher
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
        p = rng.dirichlet(np.full(k + 1, sharp), size=t)
        members.append(_batch(ids, p[:, :k], p[:, k]))
    fused, w = fuse_topk(members, vocab, k=4, mode="dynamic")
    wt = w[0][fused.mask[0]]
    np.testing.assert_allclose(wt.sum(1), 1.0, rtol=1e-5)
    assert (wt >= 0).all() and np.ptp(wt[:, 0]) > 0.01  # weights differ between tokens
    _, z = union_logprobs(members, vocab)
    zt = torch.from_numpy(z).float()
    uniform = torch.full((t, 2), 0.5)
    assert (fusion_objective(zt, torch.from_numpy(wt)) <= fusion_objective(zt, uniform) + 1e-5).all()


def test_members_with_different_tokens_are_refused() -> None:
    a = _batch([[0, 1], [2, 3]], [[0.5, 0.3], [0.7, 0.1]], [0.2, 0.2])
    b = _batch([[4, 5]], [[0.9, 0.05]], [0.05], pad=1)
    with pytest.raises(ValueError, match="different tokens"):
        fuse_topk([a, b], vocab=8, k=2, mode="uniform")
