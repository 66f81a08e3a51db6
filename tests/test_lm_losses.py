"""Token-level causal-LM losses: hand-computed values (sparse top-k + tail bucket and dense), the
next-token mask, chunking, the sparse k = V == dense invariant, JSD limits, extreme logits,
cross-vocabulary ULD, hidden-state matching, and TRL's generalized_jsd_loss as an oracle.

References are written out in plain Python floats (math module), independent of the torch code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from kdpipe.lm.token_functional import (
    TeacherSignal,
    chunked_token_sum,
    next_token_mask,
    sparse_teacher_logprobs,
)
from kdpipe.losses import LOSSES, LossContext
from kdpipe.losses.suite import LossSuite
from kdpipe.losses.token_kl import TokenDistributionLoss

torch.set_num_threads(1)

# values are read with float() from tensors that keep their graph (gradients are checked after)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

CTX = LossContext(num_classes=0, teachers=["t"])
DIST_LOSSES = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "uld"}
T2_SCALED = {"forward_kl", "reverse_kl", "jsd", "skew_kl"}
# one parametrisation per loss (and the interesting variants) for value tests
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.2}),
    ("skew_kl", {"alpha": 0.2, "reverse": True}),
    ("tvd", {}),
    ("uld", {}),
]


def _loss(name: str, ctx: LossContext = CTX, **params: Any) -> Any:
    cls = LOSSES.get(name)
    return cls(cls.Params(**params), ctx)


def _token_dist_names() -> list[str]:
    return [n for n in LOSSES.names() if issubclass(LOSSES.get(n), TokenDistributionLoss)]


# --- plain-Python references ------------------------------------------------------------------------


def _softmax(z: list[float], T: float = 1.0) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _mix(w: float, a: list[float], b: list[float]) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def _ref_div(name: str, p: list[float], q: list[float], prm: dict[str, Any]) -> float:
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        b = prm.get("beta", 0.5)
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = _mix(b, p, q)
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skew_kl":
        a = prm.get("alpha", 0.1)
        if prm.get("reverse"):
            p, q = q, p
        return _kl(p, _mix(a, p, q))
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise KeyError(name)


def _teacher_buckets(logp: list[float], tail: float, V: int, T: float) -> list[float]:
    """The cached top-k with its tail spread uniformly over the V − k other ids, softened at T, bucketed."""
    k = len(logp)
    n = V - k
    full = list(logp) + ([tail - math.log(n)] * n if n else [])
    p = _softmax(full, T)
    return p[:k] + [sum(p[k:])]


def _student_buckets(s: list[float], ids: list[int], T: float) -> list[float]:
    q = _softmax(s, T)
    return [q[i] for i in ids] + [sum(q[j] for j in range(len(s)) if j not in ids)]


def _sorted_l1(p: list[float], q: list[float]) -> float:
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    n = max(len(p), len(q))
    p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
    return sum(abs(x - y) for x, y in zip(p, q))


def _ref_token(
    name: str,
    prm: dict[str, Any],
    s: list[float],
    batch: dict[str, torch.Tensor],
    b: int,
    t: int,
    sparse: bool,
    T: float,
) -> float:
    """The loss of one (b, t) position, from the batch's teacher columns and the student logits s."""
    V = len(s)
    if sparse:
        ids = batch["t.topk_ids"][b, t].tolist()
        p = _teacher_buckets(batch["t.topk_logp"][b, t].tolist(), float(batch["t.tail_logp"][b, t]), V, T)
        if name == "uld":
            return _sorted_l1(p[:-1], sorted(_softmax(s, T), reverse=True)[: len(ids)])
        q = _student_buckets(s, ids, T)
    else:
        p = _softmax(batch["t.logits"][b, t].tolist(), T)
        if name == "uld":
            return _sorted_l1(p, _softmax(s, T))
        q = _softmax(s, T)
    return _ref_div(name, p, q, prm) * (T * T if name in T2_SCALED else 1.0)


def _ref_mean(
    name: str, prm: dict[str, Any], s: torch.Tensor, batch: dict[str, torch.Tensor], sparse: bool, T: float
) -> float:
    am = batch["attention_mask"].tolist()
    vals = [
        _ref_token(name, prm, s[b, t].tolist(), batch, b, t, sparse, T)
        for b in range(s.shape[0])
        for t in range(s.shape[1] - 1)
        if am[b][t] and am[b][t + 1]
    ]
    return sum(vals) / len(vals)


# --- batches ----------------------------------------------------------------------------------------


def _sparse_from_logits(t: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k cache columns of teacher logits t (B, T, V): ids, log-probs (descending) and the tail's log-mass."""
    logp = t.float().log_softmax(-1)
    top = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return {"t.topk_ids": top.indices, "t.topk_logp": top.values, "t.tail_logp": tail}


def _case(
    seed: int = 0, V: int = 5, k: int = 2, B: int = 2, T: int = 4, scale: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Student logits (B, T, V) and the same teacher as a sparse and a dense batch; row 1 is right-padded."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g)
    t = torch.randn(B, T, V, generator=g) * scale
    am = torch.ones(B, T, dtype=torch.int64)
    am[1:, T - 1 :] = 0
    base = {"input_ids": torch.randint(0, V, (B, T), generator=g), "attention_mask": am}
    return s, {**base, **_sparse_from_logits(t, k)}, {**base, "t.logits": t}


def _value_and_grad(loss: Any, s: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor, dict]:
    x = s.clone().requires_grad_(True)
    value, parts = loss({"logits": x}, batch)
    value.backward()
    assert x.grad is not None
    return float(value), x.grad, parts


# --- the mask and the teacher signal ----------------------------------------------------------------


def test_next_token_mask_drops_last_real_token_and_padding() -> None:
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]).bool()
    assert torch.equal(next_token_mask(am), want)


def test_teacher_signal_reads_sparse_or_dense_and_names_missing_columns() -> None:
    _, sparse, dense = _case()
    sig = TeacherSignal.from_batch(sparse, "t")
    assert sig.is_sparse and sig.width == 2 and sig.flat().topk_ids.shape == (8, 2)
    assert sig.flat().rows(torch.tensor([5])).tail_logp.shape == (1,)
    both = {**sparse, "t.logits": dense["t.logits"]}
    assert TeacherSignal.from_batch(both, "t").is_sparse  # auto prefers the cache
    assert not TeacherSignal.from_batch(both, "t", "dense").is_sparse
    assert TeacherSignal.from_batch(dense, "t").width == 5
    with pytest.raises(KeyError, match="t.topk_ids"):
        TeacherSignal.from_batch(dense, "t", "topk")
    with pytest.raises(KeyError, match="neither"):
        TeacherSignal.from_batch({"attention_mask": sparse["attention_mask"]}, "t")


def test_sparse_teacher_temperature_spreads_the_tail_uniformly() -> None:
    logp, tail, V, T = [math.log(0.5), math.log(0.2)], math.log(0.3), 6, 3.0
    got = sparse_teacher_logprobs(torch.tensor([logp]), torch.tensor([tail]), V, T).exp()[0].tolist()
    assert got == pytest.approx(_teacher_buckets(logp, tail, V, T), rel=1e-6)
    at1 = sparse_teacher_logprobs(torch.tensor([logp]), torch.tensor([tail]), V, 1.0).exp()[0].tolist()
    assert at1 == pytest.approx([0.5, 0.2, 0.3], rel=1e-6)


# --- hand-computed values ---------------------------------------------------------------------------


def _literal_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """V = 4, k = 2: teacher buckets p = [1/2, 1/4 | tail 1/4]; uniform student q = [1/4, 1/4 | 1/2].

    Only position 0 counts (position 1 is the last real token).
    """
    batch = {
        "attention_mask": torch.tensor([[1, 1]]),
        "input_ids": torch.tensor([[0, 3]]),
        "t.topk_ids": torch.tensor([[[0, 1], [2, 3]]]),
        "t.topk_logp": torch.tensor([[[math.log(0.5), math.log(0.25)], [-0.1, -5.0]]]),
        "t.tail_logp": torch.tensor([[math.log(0.25), -3.0]]),
    }
    return torch.zeros(1, 2, 4), batch


@pytest.mark.parametrize(
    ("name", "params", "want"),
    [
        ("forward_kl", {}, 0.25 * math.log(2)),  # ½ ln(½/¼) + ¼ ln 1 + ¼ ln(¼/½)
        ("reverse_kl", {}, 0.25 * math.log(2)),  # ¼ ln(¼/½) + ¼ ln 1 + ½ ln(½/¼)
        ("jsd", {"beta": 0.5}, 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)),  # m = [3/8, 1/4, 3/8], both KLs equal
        ("skew_kl", {"alpha": 0.5}, 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)),
        ("tvd", {}, 0.25),  # ½ (¼ + 0 + ¼)
        ("uld", {}, 0.25),  # sorted top-2: [½, ¼] vs [¼, ¼]
    ],
)
def test_literal_values_on_four_ids(name: str, params: dict[str, Any], want: float) -> None:
    s, batch = _literal_batch()
    value, parts = _loss(name, **params)({"logits": s}, batch)
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert float(parts["tokens"]) == 1.0


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=[f"{n}{p}" for n, p in VARIANTS])
def test_values_match_plain_python(name: str, params: dict[str, Any], sparse: bool, T: float) -> None:
    s, sb, db = _case(seed=1)
    batch = sb if sparse else db
    value, _, parts = _value_and_grad(_loss(name, temperature=T, **params), s, batch)
    assert value == pytest.approx(_ref_mean(name, params, s, batch, sparse, T), rel=1e-5, abs=1e-6)
    assert float(parts["tokens"]) == 5.0  # 3 positions in the full row, 2 in the padded one


def test_lm_ce_matches_cross_entropy_on_real_next_tokens() -> None:
    s, batch, _ = _case(seed=2)
    value, grad, parts = _value_and_grad(_loss("lm_ce"), s, batch)
    ids, am = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    terms = [
        -math.log(_softmax(s[b, t].tolist())[ids[b][t + 1]])
        for b in range(2)
        for t in range(3)
        if am[b][t] and am[b][t + 1]
    ]
    assert value == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert float(parts["tokens"]) == len(terms) == 5
    assert float(grad[1, 2:].abs().sum()) == 0.0 and float(grad[0, 3].abs().sum()) == 0.0


# --- invariants every token distribution loss must satisfy (parametrised over the registry) ----------


def test_registry_holds_the_token_losses() -> None:
    assert set(_token_dist_names()) == DIST_LOSSES
    assert {"lm_ce", "hidden_token"} <= set(LOSSES.names())


@pytest.mark.parametrize("name", _token_dist_names())
def test_params_are_strict_and_documented(name: str) -> None:
    cls = LOSSES.get(name)
    assert all(f.description for f in cls.Params.model_fields.values()), "every param needs a description"
    with pytest.raises(ValidationError, match="temprature"):
        cls.Params(temprature=2.0)
    with pytest.raises(ValidationError):
        cls.Params(temperature=0.0)
    with pytest.raises(ValidationError):
        cls.Params(chunk_tokens=0)


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("name", _token_dist_names())
def test_topk_with_k_equal_V_equals_dense(name: str, T: float) -> None:
    s, sb, db = _case(seed=3, k=5)
    assert torch.isneginf(sb["t.tail_logp"]).all()
    vs, gs, _ = _value_and_grad(_loss(name, temperature=T), s, sb)
    vd, gd, _ = _value_and_grad(_loss(name, temperature=T), s, db)
    assert vs == pytest.approx(vd, rel=1e-5, abs=1e-6)
    assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
@pytest.mark.parametrize("name", [*_token_dist_names(), "lm_ce"])
def test_chunked_equals_unchunked(name: str, sparse: bool) -> None:
    s, sb, db = _case(seed=4, T=6)
    batch = sb if sparse else db
    v0, g0, _ = _value_and_grad(_loss(name, temperature=2.0) if name != "lm_ce" else _loss(name), s, batch)
    for chunk in (1, 2, 3):
        kw = {"chunk_tokens": chunk} | ({"temperature": 2.0} if name != "lm_ce" else {})
        v, g, _ = _value_and_grad(_loss(name, **kw), s, batch)
        assert v == pytest.approx(v0, rel=1e-6)
        assert torch.allclose(g, g0, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
@pytest.mark.parametrize("name", [*_token_dist_names(), "lm_ce"])
def test_masked_positions_change_nothing(name: str, sparse: bool) -> None:
    s, sb, db = _case(seed=5)
    batch = sb if sparse else db
    v0, g0, _ = _value_and_grad(_loss(name), s, batch)
    counted = next_token_mask(batch["attention_mask"])
    g = torch.Generator().manual_seed(9)
    s2 = torch.where(counted[..., None], s, torch.randn(s.shape, generator=g) * 50)
    b2 = dict(batch)
    for col in ("t.logits", "t.topk_logp", "t.tail_logp"):
        if col in b2:
            noise = torch.randn(b2[col].shape, generator=g) * 10
            m = counted.reshape(counted.shape + (1,) * (b2[col].ndim - 2))
            b2[col] = torch.where(m, b2[col], noise)
    if "t.topk_ids" in b2:
        b2["t.topk_ids"] = torch.where(counted[..., None], b2["t.topk_ids"], b2["t.topk_ids"].flip(-1))
    b2["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], 0)
    v1, g1, _ = _value_and_grad(_loss(name), s2, b2)
    assert v1 == pytest.approx(v0, rel=1e-6)
    assert torch.equal(g1, g0)
    assert float(g0[~counted].abs().sum()) == 0.0


@pytest.mark.parametrize("name", _token_dist_names())
def test_zero_when_student_equals_teacher(name: str) -> None:
    s, _, _ = _case(seed=6)
    dense = {"attention_mask": torch.ones(2, 4, dtype=torch.int64), "t.logits": s.clone()}
    for T in (1.0, 2.5):
        assert float(_loss(name, temperature=T)({"logits": s}, dense)[0]) == pytest.approx(0.0, abs=1e-6)
    # sparse: a student whose non-kept logits are equal is represented exactly by k ids + tail, at any T
    u = s.clone()
    u[..., :2] = s[..., :2].abs() + 1.0
    u[..., 2:] = -0.7
    sparse = {"attention_mask": dense["attention_mask"], **_sparse_from_logits(u, 2)}
    assert int(sparse["t.topk_ids"].max()) == 1
    for T in (1.0, 2.5):
        assert float(_loss(name, temperature=T)({"logits": u}, sparse)[0]) == pytest.approx(0.0, abs=1e-6)
    other = float(_loss(name)({"logits": -s}, dense)[0])
    assert other > 1e-3  # and clearly non-zero when they differ


@pytest.mark.parametrize("sparse", ["top2", "topV", "dense"])
@pytest.mark.parametrize("name", [*_token_dist_names(), "lm_ce"])
def test_gradients_flow_and_are_finite_at_extreme_logits(name: str, sparse: str) -> None:
    """Student logits at ±1e4 (two tied maxima, so softmax is not fully saturated); teacher at ±1e4 too."""
    B, T, V = 2, 3, 5
    s = torch.full((B, T, V), -1e4)
    s[..., 0] = 1e4
    s[..., 1] = 1e4
    t = torch.tensor([4.0, 0.5, 0.0, -1.0, -1e4]).expand(B, T, V).clone()  # p0 > ½ > p1 at T = 1 and 2: TVD moves
    base = {"attention_mask": torch.ones(B, T, dtype=torch.int64), "input_ids": torch.tensor([[0, 3, 2], [1, 4, 0]])}
    batch = (
        {**base, "t.logits": t}
        if sparse == "dense"
        else {**base, **_sparse_from_logits(t, 2 if sparse == "top2" else V)}
    )
    for temperature in (1.0, 2.0):
        loss = _loss(name) if name == "lm_ce" else _loss(name, temperature=temperature)
        value, grad, _ = _value_and_grad(loss, s, batch)
        assert math.isfinite(value) and value > 0
        assert torch.isfinite(grad).all()
        assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("variant", ["forward_kl-topk", "forward_kl-dense", "lm_ce"])
def test_saturated_wrong_student_is_pulled_towards_the_target(variant: str) -> None:
    """Student sure of id 2 (logits ±1e4), teacher/data on id 0: the value is the true ≈ 2e4·p and the
    gradient raises id 0 — student log-probs must not be clamped (a floor would zero this gradient)."""
    s = torch.full((1, 2, 4), -1e4)
    s[..., 2] = 1e4
    t = torch.tensor([[[3.0, 1.0, -2.0, -2.0]] * 2])
    base = {"attention_mask": torch.ones(1, 2, dtype=torch.int64), "input_ids": torch.tensor([[1, 0]])}
    if variant == "lm_ce":
        loss, batch, p0 = _loss("lm_ce"), base, 1.0
    else:
        batch = {**base, **(_sparse_from_logits(t, 2) if variant.endswith("topk") else {"t.logits": t})}
        loss, p0 = _loss("forward_kl"), _softmax(t[0, 0].tolist())[0]
    value, grad, _ = _value_and_grad(loss, s, batch)
    assert value > 0.9 * p0 * 2e4
    assert float(grad[0, 0, 0]) < -0.5 * p0 and float(grad[0, 0, 2]) > 0


@pytest.mark.parametrize("name", _token_dist_names())
def test_nonnegative_and_global_token_normalisation(name: str) -> None:
    """value·tokens summed over shards / Σ tokens equals the whole batch's value (what a DDP loop needs)."""
    s, sb, _ = _case(seed=7, B=3, T=5)
    sb["attention_mask"][2, 2:] = 0
    loss = _loss(name, temperature=1.5)
    whole, parts = loss({"logits": s}, sb)
    assert float(whole) >= 0
    shards = [loss({"logits": s[i : i + 1]}, {k: v[i : i + 1] for k, v in sb.items()}) for i in range(3)]
    num = sum(float(v) * float(p["tokens"]) for v, p in shards)
    den = sum(float(p["tokens"]) for _, p in shards)
    assert den == float(parts["tokens"]) == 4 + 3 + 1  # rows of 5, 4 and 2 real tokens
    assert num / den == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.parametrize("name", [*_token_dist_names(), "lm_ce"])
def test_a_batch_without_counted_tokens_gives_zero_with_a_graph(name: str) -> None:
    s, sb, _ = _case(seed=16)
    sb["attention_mask"][:, 1:] = 0  # one real token per row: nothing to predict
    value, grad, parts = _value_and_grad(_loss(name), s, sb)
    assert value == 0.0 and float(parts["tokens"]) == 0.0 and float(grad.abs().sum()) == 0.0


# --- loss-specific math ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
def test_jsd_limits_are_forward_and_reverse_kl(sparse: bool) -> None:
    s, sb, db = _case(seed=8)
    batch = sb if sparse else db

    def val(name: str, **kw: Any) -> float:
        return float(_loss(name, temperature=2.0, **kw)({"logits": s}, batch)[0])

    fwd, rev = val("forward_kl"), val("reverse_kl")
    assert val("jsd", beta=0.0) == pytest.approx(fwd, rel=1e-6)
    assert val("jsd", beta=1.0) == pytest.approx(rev, rel=1e-6)
    eps = 1e-3
    assert val("jsd", beta=eps) / eps == pytest.approx(fwd, rel=1e-2)  # JSD(β) = β·KL(p‖q) + O(β²)
    assert val("jsd", beta=1 - eps) / eps == pytest.approx(rev, rel=1e-2)
    assert fwd != pytest.approx(rev, rel=1e-2)  # the limits are distinguishable on this case
    assert val("skew_kl", alpha=0.0) == pytest.approx(fwd, rel=1e-6)
    assert val("skew_kl", alpha=0.0, reverse=True) == pytest.approx(rev, rel=1e-6)


def test_symmetric_losses_are_symmetric() -> None:
    s, _, db = _case(seed=9)
    t = db["t.logits"]
    base = {"attention_mask": db["attention_mask"]}
    for name, kw in (("tvd", {}), ("jsd", {"beta": 0.5}), ("uld", {})):
        a = float(_loss(name, **kw)({"logits": s}, {**base, "t.logits": t})[0])
        b = float(_loss(name, **kw)({"logits": t}, {**base, "t.logits": s})[0])
        assert a == pytest.approx(b, rel=1e-5)
    a = float(_loss("forward_kl")({"logits": s}, {**base, "t.logits": t})[0])
    b = float(_loss("forward_kl")({"logits": t}, {**base, "t.logits": s})[0])
    assert a != pytest.approx(b, rel=1e-3)


def test_reverse_kl_penalises_student_mass_outside_the_teachers_top_k() -> None:
    """A student that moves mass onto ids the teacher ranks below its top-k pays through the tail bucket."""
    t = torch.tensor([[[4.0, 3.0, -3.0, -3.0, -3.0]] * 2])
    batch = {"attention_mask": torch.ones(1, 2, dtype=torch.int64), **_sparse_from_logits(t, 2)}
    close = torch.tensor([[[4.0, 3.0, -3.0, -3.0, -3.0]] * 2])
    off = torch.tensor([[[4.0, 3.0, 5.0, -3.0, -3.0]] * 2])
    loss = _loss("reverse_kl")
    assert float(loss({"logits": off}, batch)[0]) > float(loss({"logits": close}, batch)[0]) + 1.0


def test_uld_across_vocabularies_of_different_sizes() -> None:
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 3, 5, generator=g)  # student V = 5
    t = torch.randn(2, 3, 7, generator=g) * 2  # teacher V = 7
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    dense = {"attention_mask": am, "t.logits": t}
    value, grad, _ = _value_and_grad(_loss("uld"), s, dense)
    assert value == pytest.approx(_ref_mean("uld", {}, s, dense, False, 1.0), rel=1e-5)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    # the teacher's cached ids (up to 6) need not exist in the student's vocabulary
    sparse = {"attention_mask": am, **_sparse_from_logits(t, 3)}
    assert int(sparse["t.topk_ids"].max()) >= 5
    value, _, _ = _value_and_grad(_loss("uld", teacher_vocab=7, temperature=2.0), s, sparse)
    want = []
    for b, tt in ((0, 0), (0, 1), (1, 0)):
        p = _teacher_buckets(sparse["t.topk_logp"][b, tt].tolist(), float(sparse["t.tail_logp"][b, tt]), 7, 2.0)[:-1]
        want.append(_sorted_l1(p, sorted(_softmax(s[b, tt].tolist(), 2.0), reverse=True)[:3]))
    assert value == pytest.approx(sum(want) / 3, rel=1e-5)
    # top_k on a dense teacher compares only the k largest on both sides
    v2 = float(_loss("uld", top_k=2)({"logits": s}, dense)[0])
    want2 = [
        _sorted_l1(
            sorted(_softmax(t[b, tt].tolist()), reverse=True)[:2], sorted(_softmax(s[b, tt].tolist()), reverse=True)[:2]
        )
        for b, tt in ((0, 0), (0, 1), (1, 0))
    ]
    assert v2 == pytest.approx(sum(want2) / 3, rel=1e-5)


@pytest.mark.parametrize("name", sorted(DIST_LOSSES - {"uld"}))
def test_shared_vocabulary_is_checked_with_a_clear_error(name: str) -> None:
    s, sb, db = _case(seed=11)
    with pytest.raises(ValueError, match="share a vocabulary"):
        _loss(name)({"logits": s}, {**db, "t.logits": torch.randn(2, 4, 6)})
    bad = dict(sb)
    bad["t.topk_ids"] = sb["t.topk_ids"].clone()
    bad["t.topk_ids"][0, 0, 0] = 5
    with pytest.raises(ValueError, match="reach 5"):
        _loss(name)({"logits": s}, bad)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        _loss(name)({"logits": s[:, :3]}, sb)


def test_param_ranges() -> None:
    with pytest.raises(ValidationError):
        LOSSES.get("jsd").Params(beta=1.5)
    with pytest.raises(ValidationError):
        LOSSES.get("skew_kl").Params(alpha=1.0)
    with pytest.raises(ValidationError, match="chunk_tokens"):
        LOSSES.get("lm_ce").Params(chunk_tokens=0)
    with pytest.raises(ValidationError, match="temperature"):
        LOSSES.get("lm_ce").Params(temperature=2.0)  # the data term has no temperature


# --- the chunked driver ------------------------------------------------------------------------------


def test_chunked_driver_matches_autograd_and_runs_backward_once() -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    pos = torch.tensor([0, 2, 3, 4])
    w = torch.randn(6, 4, generator=g)

    def fn(s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (F.log_softmax(s, 1) * w[rows]).sum(1) ** 2

    total = chunked_token_sum(x, pos, fn, 3) * 2.5
    total.backward(retain_graph=True)
    y = x.detach().clone().requires_grad_(True)
    (fn(y.reshape(-1, 4)[pos], pos).sum() * 2.5).backward()
    assert float(total) == pytest.approx(float(fn(y.detach().reshape(-1, 4)[pos], pos).sum() * 2.5), rel=1e-6)
    assert torch.allclose(x.grad, y.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="once"):
        total.backward()
    with torch.no_grad():  # no gradient buffer, same value
        assert float(chunked_token_sum(x, pos, fn, 2)) == pytest.approx(float(total) / 2.5, rel=1e-6)


# --- suite integration -------------------------------------------------------------------------------


def test_suite_combines_lm_ce_and_kd_with_token_counts() -> None:
    s, sb, _ = _case(seed=13)
    suite = LossSuite(
        [{"name": "lm_ce", "weight": 0.5}, {"name": "forward_kl", "weight": 2.0, "temperature": 2.0}], CTX
    )
    x = s.clone().requires_grad_(True)
    total, parts = suite({"logits": x}, sb)
    assert float(total) == pytest.approx(0.5 * float(parts["lm_ce"]) + 2.0 * float(parts["forward_kl"]), rel=1e-6)
    assert float(parts["lm_ce.tokens"]) == float(parts["forward_kl.tokens"]) == 5.0
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


# --- hidden states -----------------------------------------------------------------------------------


def _hidden_batch(H_s: int = 3, H_t: int = 3) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(14)
    hs = tuple(torch.randn(2, 3, H_s, generator=g, requires_grad=True) for _ in range(3))
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "t.hidden.2": torch.randn(2, 3, H_t, generator=g),
        "t.hidden.4": torch.randn(2, 3, H_t, generator=g),
    }
    return {"hidden_states": hs}, batch


def test_hidden_token_mse_and_cosine_hand_values_over_real_tokens() -> None:
    student, batch = _hidden_batch()
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # every real token, the last one too
    h, t = student["hidden_states"][1].tolist(), batch["t.hidden.4"].tolist()
    mse = sum((a - b) ** 2 for bt in real for a, b in zip(h[bt[0]][bt[1]], t[bt[0]][bt[1]])) / (5 * 3)
    value, parts = _loss("hidden_token", layer_map={1: 4})(student, batch)
    assert float(value) == pytest.approx(mse, rel=1e-6) and float(parts["tokens"]) == 5

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    want = sum(1 - cos(h[b][tt], t[b][tt]) for b, tt in real) / 5
    value, _ = _loss("hidden_token", layer_map={1: 4}, metric="cosine")(student, batch)
    assert float(value) == pytest.approx(want, rel=1e-6)
    # padding does not count; two pairs average
    batch["t.hidden.4"][1, 2] += 100.0
    assert float(_loss("hidden_token", layer_map={1: 4})(student, batch)[0]) == pytest.approx(mse, rel=1e-6)
    both, parts = _loss("hidden_token", layer_map={1: 4, 2: 2})(student, batch)
    assert float(both) == pytest.approx((float(parts["l1_4"]) + float(parts["l2_2"])) / 2, rel=1e-6)


def test_hidden_token_learns_a_projection_when_widths_differ() -> None:
    student, batch = _hidden_batch(H_s=3, H_t=4)
    ctx = LossContext(0, ["t"], widths={"student.hidden_states": 3, "t.hidden.4": 4})
    loss = _loss("hidden_token", ctx, layer_map={2: 4})
    assert isinstance(loss.proj["2"], torch.nn.Linear) and tuple(loss.proj["2"].weight.shape) == (4, 3)
    with torch.no_grad():
        loss.proj["2"].weight.zero_()
        loss.proj["2"].weight[:3] = torch.eye(3)
        loss.proj["2"].bias.zero_()
    h = student["hidden_states"][2]
    target = torch.cat([h.detach(), torch.full((2, 3, 1), 2.0)], dim=-1)  # equal except the 4th unit: 0 vs 2
    value, _ = loss(student, {**batch, "t.hidden.4": target})
    assert float(value) == pytest.approx(4.0 / 4, rel=1e-6)
    value.backward()
    assert loss.proj["2"].weight.grad is not None and float(loss.proj["2"].weight.grad.abs().sum()) > 0
    assert (
        sum(p.numel() for p in LossSuite([{"name": "hidden_token", "layer_map": {2: 4}}], ctx).parameters())
        == 4 * 3 + 4
    )
    # equal widths: no projection unless asked for
    same = LossContext(0, ["t"], widths={"student.hidden_states": 3, "t.hidden.4": 3})
    assert not list(_loss("hidden_token", same, layer_map={2: 4}).parameters())
    assert list(_loss("hidden_token", same, layer_map={2: 4}, project=True).parameters())


def test_hidden_token_errors_name_the_problem() -> None:
    student, batch = _hidden_batch(H_s=3, H_t=4)
    with pytest.raises(ValueError, match="student.hidden_states"):
        _loss("hidden_token", layer_map={1: 2}, project=True)
    with pytest.raises(ValueError, match="project: true"):
        _loss("hidden_token", layer_map={1: 2})(student, batch)
    with pytest.raises(ValueError, match="returns 3 hidden states"):
        _loss("hidden_token", layer_map={5: 2})(student, batch)
    with pytest.raises(KeyError, match="t.hidden.9"):
        _loss("hidden_token", layer_map={1: 9})(student, batch)
    with pytest.raises(ValidationError, match="layer_map"):
        LOSSES.get("hidden_token").Params(layer_map={})
    with pytest.raises(ValidationError):
        LOSSES.get("hidden_token").Params(layer_map={1: 2}, metric="l1")


# --- oracle: TRL's GKD generalised JSD -----------------------------------------------------------------


def _trl_jsd() -> Callable[..., torch.Tensor]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl (dev oracle) is not installed")
    gkd = pytest.importorskip("trl.experimental.gkd", reason="this trl has no trl.experimental.gkd.GKDTrainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_matches_trl_generalized_jsd_loss(T: float) -> None:
    oracle = _trl_jsd()
    s, _, db = _case(seed=15, V=7, T=5)
    t = db["t.logits"]
    counted = next_token_mask(db["attention_mask"])
    labels = torch.where(counted, 0, -100)[:, :-1]  # TRL's mask: -100 where a position does not count
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        want = oracle(s[:, :-1], t[:, :-1], labels=labels, beta=beta, temperature=T, reduction="batchmean")
        got, _ = _loss("jsd", beta=beta, temperature=T)({"logits": s}, db)
        assert float(got) / T**2 == pytest.approx(float(want), rel=1e-5, abs=1e-7), beta
