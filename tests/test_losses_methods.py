"""dkd, feature_mse, aspect_bce, self_distill, fusion_kd and the class_aspects teacher: values on
small hand-made tensors (hand computation or a reference implementation), gradients, spec checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from kdpipe.config import SpecError, load_spec
from kdpipe.errors import KdpipeError
from kdpipe.losses import LOSSES, LossContext
from kdpipe.losses.dkd import dkd_terms
from kdpipe.losses.functional import kd_dense
from kdpipe.losses.suite import LossSuite

# values are read with float() from tensors that keep their graph (the gradient is checked after)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _softmax(z: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _loss(name: str, ctx: LossContext, **params):
    cls = LOSSES.get(name)
    return cls(cls.Params(**params), ctx)


# --- DKD -------------------------------------------------------------------------------------------


def _dkd_reference(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, T: float
) -> torch.Tensor:
    """The published formulation (mdistiller's dkd_loss), written out plainly."""
    gt = F.one_hot(y, s.shape[1]).float()
    other = 1 - gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / s.shape[0]
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    ls2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * T**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_terms_match_hand_computation() -> None:
    s, t, y, T = [1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 1, 2.0
    ps, pt = _softmax(s, T), _softmax(t, T)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    nt, ns = _softmax([t[0], t[2]], T), _softmax([s[0], s[2]], T)
    nckd = _kl(nt, ns)
    got_t, got_n = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T)
    assert float(got_t) == pytest.approx(tckd, rel=1e-5)
    assert float(got_n) == pytest.approx(nckd, rel=1e-5)
    # classic KD decomposes exactly: KD = TCKD + (1 - p_t[y]) · NCKD
    kd = float(kd_dense(torch.tensor([s]), torch.tensor([t]), T)) / T**2
    assert kd == pytest.approx(tckd + (1 - pt[y]) * nckd, rel=1e-5)


def test_dkd_loss_matches_reference_implementation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    loss = _loss("dkd", LossContext(5, ["t"]), alpha=0.5, beta=4.0, temperature=3.0)
    value, parts = loss({"logits": s}, {"t.logits": t, "label": y})
    assert float(value) == pytest.approx(float(_dkd_reference(s, t, y, 0.5, 4.0, 3.0)), rel=1e-4)
    assert float(value) == pytest.approx(0.5 * float(parts["tckd"]) + 4.0 * float(parts["nckd"]), rel=1e-6)


def test_dkd_unlabeled_rows_use_teacher_argmax_or_are_skipped() -> None:
    s = torch.tensor([[0.5, 0.2, -0.3], [1.0, -1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([-1, 2])
    ctx = LossContext(3, ["t"])
    got, _ = _loss("dkd", ctx, temperature=2.0)({"logits": s}, {"t.logits": t, "label": y})
    want = _dkd_reference(s.detach(), t, torch.tensor([1, 2]), 1.0, 8.0, 2.0)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    skip, _ = _loss("dkd", ctx, temperature=2.0, unlabeled="skip")({"logits": s}, {"t.logits": t, "label": y})
    assert float(skip.detach()) == pytest.approx(
        float(_dkd_reference(s[1:].detach(), t[1:], y[1:], 1.0, 8.0, 2.0)), rel=1e-5
    )
    none, _ = _loss("dkd", ctx, unlabeled="skip")({"logits": s}, {"t.logits": t, "label": torch.tensor([-1, -1])})
    assert float(none.detach()) == 0.0


def test_dkd_is_zero_when_student_equals_teacher_and_reads_topk() -> None:
    from kdpipe.teach import topk_compress

    t = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    loss = _loss("dkd", LossContext(4, ["t"]), use_topk=True)
    idx, val, tail = topk_compress(t.numpy(), 4)
    batch = {
        "t.topk_idx": torch.from_numpy(idx),
        "t.topk_val": torch.from_numpy(val),
        "t.tail_lse": torch.from_numpy(tail),
        "label": torch.tensor([0]),
    }
    value, _ = loss({"logits": t}, batch)
    assert float(value) == pytest.approx(0.0, abs=1e-3)  # fp16 top-k values


# --- feature_mse -----------------------------------------------------------------------------------


def test_feature_mse_identity_when_widths_agree() -> None:
    ctx = LossContext(3, ["t"], widths={"student.hidden": 2, "t.embedding": 2})
    loss = _loss("feature_mse", ctx)
    h = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    e = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    value, _ = loss({"hidden": h}, {"t.embedding": e})
    assert float(value) == pytest.approx((1 + 0 + 1 + 4) / 4)
    assert not list(loss.parameters())


def test_feature_mse_learns_a_projection_when_widths_differ() -> None:
    ctx = LossContext(3, ["t"], widths={"student.hidden": 3, "t.feat.2": 5})
    loss = _loss("feature_mse", ctx, teacher_output="feat.2")
    assert isinstance(loss.proj, torch.nn.Linear) and tuple(loss.proj.weight.shape) == (5, 3)
    with torch.no_grad():
        loss.proj.weight.zero_()
        loss.proj.weight[:3, :3] = torch.eye(3)
        loss.proj.bias.fill_(1.0)
    h = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    t = torch.tensor([[2.0, 3.0, 4.0, 1.0, 3.0]])  # = W h + 1 except the last entry (1 vs 3)
    value, _ = loss({"hidden": h}, {"t.feat.2": t})
    assert float(value.detach()) == pytest.approx(4 / 5)
    value.backward()
    assert h.grad is not None and loss.proj.weight.grad is not None and loss.proj.weight.grad.abs().sum() > 0
    # inside a suite the projection is a trainable parameter of the loss module
    suite = LossSuite([{"name": "feature_mse", "teacher_output": "feat.2"}], ctx)
    assert sum(p.numel() for p in suite.parameters()) == 5 * 3 + 5


def test_feature_mse_normalize_and_width_errors() -> None:
    ctx = LossContext(3, ["t"], widths={"student.hidden": 2, "t.embedding": 2})
    loss = _loss("feature_mse", ctx, normalize=True)
    h, e = torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])
    assert float(loss({"hidden": h}, {"t.embedding": e})[0]) == pytest.approx(0.0, abs=1e-7)
    orth = loss({"hidden": torch.tensor([[1.0, 0.0]])}, {"t.embedding": torch.tensor([[0.0, 5.0]])})[0]
    assert float(orth) == pytest.approx(1.0)  # (1² + 1²) / 2 = (2 - 2·cos 90°) / 2
    with pytest.raises(ValueError, match="unknown width"):
        _loss("feature_mse", LossContext(3, ["t"], widths={"student.hidden": 2}))


# --- aspect_bce ------------------------------------------------------------------------------------


def test_aspect_bce_hand_values_and_gradient() -> None:
    ctx = LossContext(3, ["asp"])
    s = torch.tensor([[0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, -2.0]])
    value, _ = _loss("aspect_bce", ctx, temperature=2.0)({"aspects": s}, {"asp.aspects": t})
    a = [0.5, 1 / (1 + math.exp(1.0))]  # sigmoid(t / 2)
    p = [0.5, 1 / (1 + math.exp(-2.0))]
    want = -sum(ai * math.log(pi) + (1 - ai) * math.log(1 - pi) for ai, pi in zip(a, p)) / 2
    assert float(value) == pytest.approx(want, rel=1e-6)
    value.backward()
    assert s.grad is not None and float(s.grad[0, 0]) == pytest.approx(0.0) and float(s.grad[0, 1]) > 0


def test_aspect_bce_checks_the_student_head() -> None:
    ctx = LossContext(3, ["asp"])
    loss = _loss("aspect_bce", ctx)
    with pytest.raises(KeyError, match="aspects"):
        loss({"logits": torch.zeros(1, 3)}, {"asp.aspects": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="aspects: 2"):
        loss({"aspects": torch.zeros(1, 3)}, {"asp.aspects": torch.zeros(1, 2)})


# --- self_distill ----------------------------------------------------------------------------------


def _exits() -> list[torch.Tensor]:
    return [
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]], requires_grad=True),
        torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True),
        torch.tensor([[3.0, -1.0, 0.0], [-1.0, 2.0, 0.5]], requires_grad=True),
    ]


def test_self_distill_deepest_teaches_all_with_hand_values() -> None:
    ex = _exits()
    y = torch.tensor([0, -1])
    T = 2.0
    value, parts = _loss("self_distill", LossContext(3, []), temperature=T, kl_weight=0.5, ce_weight=2.0)(
        {"exits": ex}, {"label": y}
    )
    kl = 0.0
    for e in (0, 1):
        for r in range(2):
            kl += T * T * _kl(_softmax(ex[2][r].tolist(), T), _softmax(ex[e][r].tolist(), T)) / 2
    ce = sum(-math.log(_softmax(ex[e][0].tolist())[0]) for e in range(3))
    assert float(parts["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(value) == pytest.approx(0.5 * kl + 2.0 * ce, rel=1e-5)


def test_self_distill_next_mode_detaches_the_teacher_exit() -> None:
    ex = _exits()
    loss = _loss("self_distill", LossContext(3, []), mode="next", temperature=1.0, ce_weight=0.0)
    value, parts = loss({"exits": ex}, {"label": torch.tensor([-1, -1])})
    assert float(parts["kl_exit0"]) == pytest.approx(float(kd_dense(ex[0], ex[1], 1.0)), rel=1e-6)
    assert float(parts["kl_exit1"]) == pytest.approx(float(kd_dense(ex[1], ex[2], 1.0)), rel=1e-6)
    value.backward()
    assert ex[2].grad is None or float(ex[2].grad.abs().sum()) == 0.0  # the deepest exit is only a teacher
    assert ex[0].grad is not None and ex[0].grad.abs().sum() > 0


def test_self_distill_without_kl_is_per_exit_ce() -> None:
    ex = _exits()
    y = torch.tensor([2, 1])
    value, _ = _loss("self_distill", LossContext(3, []), kl_weight=0.0)({"exits": ex}, {"label": y})
    assert float(value) == pytest.approx(sum(float(F.cross_entropy(e, y)) for e in ex), rel=1e-6)
    shallow, _ = _loss("self_distill", LossContext(3, []), kl_weight=0.0, ce_on_deepest=False)(
        {"exits": ex}, {"label": y}
    )
    assert float(shallow) == pytest.approx(sum(float(F.cross_entropy(e, y)) for e in ex[:2]), rel=1e-6)
    with pytest.raises(KeyError, match="multi-exit"):
        _loss("self_distill", LossContext(3, []))({"logits": ex[0]}, {"label": y})


def test_self_distill_with_a_real_multi_exit_student_gets_gradients_everywhere() -> None:
    from students.multi_exit import MultiExitMLP

    torch.manual_seed(0)
    net = MultiExitMLP(4, 3, [8, 8, 8])
    suite = LossSuite(
        [{"name": "self_distill", "temperature": 2.0}, {"name": "kd", "temperature": 2.0}], LossContext(3, ["t"])
    )
    batch = {"x": torch.randn(5, 4), "label": torch.tensor([0, -1, 2, -1, 1]), "t.logits": torch.randn(5, 3)}
    total, parts = suite(net(batch), batch)
    total.backward()
    assert "self_distill.kl_exit0" in parts and all(p.grad is not None for p in net.parameters())


# --- fusion_kd -------------------------------------------------------------------------------------


def _two_teachers() -> dict[str, torch.Tensor]:
    return {
        "a.logits": torch.tensor([[4.0, 0.0, -4.0], [0.0, 1.0, 0.0]]),
        "b.logits": torch.tensor([[-4.0, 0.0, 4.0], [1.0, 0.0, 2.0]]),
        "label": torch.tensor([-1, 0]),
    }


def test_fusion_kd_static_uniform_and_dynamic() -> None:
    ctx = LossContext(3, ["a", "b"])
    batch = _two_teachers()
    s = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 1.0]], requires_grad=True)
    one_hot, parts = _loss("fusion_kd", ctx, teachers=["a", "b"], mode="static", weights=[1.0, 0.0], temperature=2.0)(
        {"logits": s}, batch
    )
    assert float(one_hot) == pytest.approx(float(kd_dense(s, batch["a.logits"], 2.0)), rel=1e-6)
    assert float(parts["w_a"]) == 1.0 and float(parts["w_b"]) == 0.0
    uni, _ = _loss("fusion_kd", ctx, teachers=["a", "b"], mode="uniform", temperature=2.0)({"logits": s}, batch)
    mean = (batch["a.logits"] + batch["b.logits"]) / 2
    assert float(uni) == pytest.approx(float(kd_dense(s, mean, 2.0)), rel=1e-6)
    dyn, parts = _loss("fusion_kd", ctx, teachers=["a", "b"], mode="dynamic", temperature=2.0)({"logits": s}, batch)
    assert math.isfinite(float(dyn)) and float(parts["w_a"]) + float(parts["w_b"]) == pytest.approx(1.0, abs=1e-5)
    dyn.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    flat, _ = _loss("fusion_kd", ctx, teachers=["a", "b"], mode="dynamic", sharpness=0.0, temperature=2.0)(
        {"logits": s}, batch
    )
    assert float(flat) == pytest.approx(float(uni), rel=1e-5)  # λ = 0: dynamic fusion is the uniform average


def test_fusion_kd_params_are_validated() -> None:
    cls = LOSSES.get("fusion_kd")
    with pytest.raises(ValueError, match="weights"):
        cls.Params(teachers=["a", "b"], mode="static")
    with pytest.raises(ValueError, match="one weight per teacher"):
        cls.Params(teachers=["a", "b"], mode="static", weights=[1.0])
    with pytest.raises(ValueError):
        cls.Params(teachers=["a"], temprature=2.0)


# --- class_aspects teacher -------------------------------------------------------------------------


def test_group_logits_is_the_log_odds_of_the_group() -> None:
    from teachers.aspects import group_logits

    z = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    masks = torch.tensor([[True, False, False, True], [False, True, False, False]])
    p = _softmax(z[0].tolist())
    got = group_logits(z, masks)
    assert float(got[0, 0]) == pytest.approx(math.log((p[0] + p[3]) / (p[1] + p[2])), rel=1e-6)
    assert float(got[0, 1]) == pytest.approx(math.log(p[1] / (1 - p[1])), rel=1e-6)
    pT = _softmax(z[0].tolist(), 2.0)
    assert float(group_logits(z, masks, 2.0)[0, 1]) == pytest.approx(math.log(pT[1] / (1 - pT[1])), rel=1e-6)


def _tiny_source(n: int = 48, classes: int = 4, dim: int = 6):
    from kdpipe.data import SourceData

    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = (rng.normal(size=(n, dim)) + np.eye(classes, dim)[y] * 3).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(n)]),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            "label": pa.array(y.astype(np.int64)),
            "split": pa.array(["train"] * n),
            "labeled": pa.array([True] * n),
        }
    )
    return SourceData(table, "features", dim, classes, "fp-tiny", ["mem"]), x


def test_class_aspects_teacher_answers_from_the_classifier(tmp_path: Path) -> None:
    from kdpipe.config import TeacherConfig
    from teachers import TEACHERS
    from teachers.aspects import group_logits

    source, x = _tiny_source()
    cfg = TeacherConfig(
        id="asp",
        kind="class_aspects",
        path=str(tmp_path / "clf"),
        outputs=["aspects", "logits"],
        params={
            "classifier": {"hidden": [8], "epochs": 3},
            "temperature": 2.0,
            "aspects": [{"name": "low", "classes": [0, 1]}, {"name": "three", "classes": [3]}],
        },
    )
    cls = TEACHERS.get("class_aspects")
    cls.prepare(
        cfg, source, str(tmp_path)
    )  # trains the wrapped mlp_classifier (labels are used only there, by its own prepare)
    assert (tmp_path / "clf" / "model.safetensors").exists()
    teacher = cls.load(cfg)
    out = teacher.forward({"x": x[:5]})  # inputs only: no labels reach the aspect answers
    assert out["aspects"].shape == (5, 2) and out["logits"].shape == (5, 4)
    masks = torch.tensor([[True, True, False, False], [False, False, False, True]])
    want = group_logits(torch.from_numpy(out["logits"]), masks, 2.0).numpy()
    np.testing.assert_allclose(out["aspects"], want, rtol=1e-5, atol=1e-5)
    bad = TeacherConfig(
        id="asp",
        kind="class_aspects",
        path=str(tmp_path / "clf"),
        params={"aspects": [{"name": "all", "classes": [0, 1, 2, 3]}]},
    )
    with pytest.raises(KdpipeError, match="leave some class out"):
        cls.prepare(bad, source, str(tmp_path))


def test_class_aspects_params_are_validated() -> None:
    from teachers.aspects import DIGIT_ASPECTS, AspectTeacherParams

    assert len(AspectTeacherParams().aspects) == len(DIGIT_ASPECTS)
    with pytest.raises(ValueError, match="unique"):
        AspectTeacherParams(aspects=[{"name": "a", "classes": [1]}, {"name": "a", "classes": [2]}])
    with pytest.raises(ValueError):
        AspectTeacherParams(aspects=[{"name": "a", "classes": [-1]}])
    with pytest.raises(ValueError):
        AspectTeacherParams(classifier={"hiddn": [3]})


# --- the pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits_fusion", "digits_aspects", "digits_selfdistill"])
def test_method_pipelines_validate(name: str) -> None:
    cfg = load_spec(f"pipelines/{name}.yaml")
    assert cfg.name == name


def test_method_pipeline_references_are_checked() -> None:
    with pytest.raises(SpecError, match="unknown teacher"):
        load_spec("pipelines/digits_fusion.yaml", {"teach.fusion.teachers": ["expert_0_4", "nobody"]})
    with pytest.raises(SpecError, match="losses\\[0\\]"):
        load_spec(
            "pipelines/digits_fusion.yaml", {"losses.0": {"name": "fusion_kd", "teachers": ["expert_0_4", "ghost"]}}
        )
    with pytest.raises(SpecError, match="kl_weigth"):
        load_spec("pipelines/digits_selfdistill.yaml", {"losses.1.kl_weigth": 1.0})
    with pytest.raises(SpecError, match="classes"):
        load_spec("pipelines/digits_aspects.yaml", {"teachers.1.params.aspects": [{"name": "x", "classes": [-3]}]})


def test_compare_variants_validate_against_their_specs() -> None:
    from kdpipe.compare import BEST_SINGLE, EXTRA_VARIANTS, VARIANTS

    for name, variants in {**VARIANTS}.items():
        for v in {**variants, **EXTRA_VARIANTS.get(name, {})}.values():
            load_spec(f"pipelines/{name}.yaml", {k: ("generalist" if x == BEST_SINGLE else x) for k, x in v.items()})
