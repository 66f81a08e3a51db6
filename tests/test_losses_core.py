"""kd / ce values against hand computation; top-k with tail bucket equals dense when k = C."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdpipe.losses import LossContext
from kdpipe.losses.functional import dense_from_topk, kd_dense, kd_topk, masked_ce
from kdpipe.losses.suite import LossSuite
from kdpipe.teach import topk_compress


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(z: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def test_kd_dense_matches_hand_computation() -> None:
    s, t, T = [1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 2.0
    want = T * T * _kl(_softmax(t, T), _softmax(s, T))
    got = kd_dense(torch.tensor([s]), torch.tensor([t]), T)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(kd_dense(torch.tensor([t]), torch.tensor([t]), T)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_topk_equals_dense_when_k_is_num_classes(T: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3
    idx, val, tail = topk_compress(t.numpy(), 10)
    assert np.isneginf(tail).all()
    dense = kd_dense(s, t, T)
    # fp32 values to isolate the bucket math from fp16 storage rounding
    top = kd_topk(
        s, torch.from_numpy(idx), torch.from_numpy(np.take_along_axis(t.numpy(), idx, 1)), torch.from_numpy(tail), T
    )
    assert float(top) == pytest.approx(float(dense), rel=1e-5)


def test_topk_tail_bucket_is_exact_at_T1() -> None:
    """At T=1 the k+1-bucket KL equals KL between the bucketed dense distributions."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g) * 2
    idx, _, tail = topk_compress(t.numpy(), 3)
    val = torch.from_numpy(np.take_along_axis(t.numpy(), idx, 1))
    got = kd_topk(s, torch.from_numpy(idx), val, torch.from_numpy(tail), 1.0)
    p, q = t.softmax(1).numpy(), s.softmax(1).numpy()
    want = 0.0
    for r in range(4):
        keep = idx[r]
        pb = list(p[r, keep]) + [1 - p[r, keep].sum()]
        qb = list(q[r, keep]) + [1 - q[r, keep].sum()]
        want += _kl(pb, qb)
    assert float(got) == pytest.approx(want / 4, rel=1e-4)


def test_dense_from_topk_restores_probabilities_of_kept_classes() -> None:
    t = torch.tensor([[3.0, 1.0, 0.5, -1.0, 0.0]])
    idx, val, tail = topk_compress(t.numpy(), 2)
    rebuilt = dense_from_topk(torch.from_numpy(idx), torch.from_numpy(val), torch.from_numpy(tail), 5)
    assert torch.allclose(rebuilt.softmax(1)[0, [0, 1]], t.softmax(1)[0, [0, 1]], atol=2e-3)
    assert float(rebuilt.logsumexp(1)) == pytest.approx(float(t.logsumexp(1)), abs=2e-3)


def test_masked_ce_ignores_unlabeled_rows_and_keeps_graph() -> None:
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True)
    y = torch.tensor([0, -1, -1])
    want = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(masked_ce(s, y)) == pytest.approx(want, rel=1e-6)
    none = masked_ce(s, torch.tensor([-1, -1, -1]))
    none.backward()
    assert float(none) == 0.0 and s.grad is not None


def test_suite_weights_parts_and_gradients() -> None:
    ctx = LossContext(num_classes=3, teachers=["t"])
    suite = LossSuite([{"name": "kd", "weight": 2.0, "temperature": 1.0}, {"name": "ce", "weight": 0.5}], ctx)
    s = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    batch = {"t.logits": torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), "label": torch.tensor([0, -1])}
    total, parts = suite({"logits": s}, batch)
    assert float(total) == pytest.approx(2.0 * float(parts["kd"]) + 0.5 * float(parts["ce"]), rel=1e-6)
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
