"""Logit fusion: static / uniform / dynamic on hand-made logits, and the `fused` teacher cache
built from member caches written with TeacherCache.commit (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from kdpipe.arrays import to_fixed_list, to_numpy
from kdpipe.cache import TeacherCache
from kdpipe.config import load_spec
from kdpipe.data import SourceData
from kdpipe.fuse_stage import fuse_caches
from kdpipe.fusion import fuse, fuse_dynamic, fuse_static, fuse_uniform, fusion_objective
from kdpipe.teach import TeachResult, topk_compress

# Two experts that each know half of 4 classes and a weak generalist, on a row of class 0:
# the expert for {2, 3} is confidently wrong (and sure the row is not 0 or 1).
EXPERT_01 = torch.tensor([[6.0, 1.0, -8.0, -8.0]])
EXPERT_23 = torch.tensor([[-8.0, -8.0, 4.0, 3.5]])
GENERALIST = torch.tensor([[1.5, 0.5, 1.0, 0.0]])
TEACHERS3 = [EXPERT_01, EXPERT_23, GENERALIST]


def _random_teachers(n: int = 3, rows: int = 16, classes: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, classes, generator=g) * (1 + 2 * i) for i in range(n)]


def test_static_fusion_with_one_hot_weights_is_that_teacher() -> None:
    ts = _random_teachers()
    for i in range(3):
        w = [0.0] * 3
        w[i] = 1.0
        fused, weights = fuse_static(ts, w)
        assert torch.equal(fused, ts[i])
        assert weights.shape == (16, 3) and torch.equal(weights[0], torch.tensor(w))


def test_static_and_uniform_are_logit_arithmetic() -> None:
    ts = _random_teachers()
    fused, _ = fuse_static(ts, [0.2, 0.3, 0.5])
    assert torch.allclose(fused, 0.2 * ts[0] + 0.3 * ts[1] + 0.5 * ts[2], atol=1e-6)
    uni, w = fuse_uniform(ts)
    assert torch.allclose(uni, sum(ts) / 3, atol=1e-6) and torch.allclose(w, torch.full((16, 3), 1 / 3))
    # numpy in, same answer; bad weight counts are refused
    assert torch.allclose(fuse_uniform([t.numpy() for t in ts])[0], uni)
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        fuse_static(ts, [0.5, 0.5])


def test_objective_matches_direct_computation() -> None:
    ts = _random_teachers(rows=4)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    T, lam = 2.0, 0.3
    got = fusion_objective(ts, w, T, lam)
    for r in range(4):
        z = sum(w[r, i] * ts[i][r] for i in range(3))
        q = F.softmax(z / T, 0)
        kls = [float((q * (q.log() - F.log_softmax(t[r] / T, 0))).sum()) for t in ts]
        ent = float(-(q * q.log()).sum())
        assert float(got[r]) == pytest.approx(sum(kls) / 3 + lam * ent, rel=1e-4, abs=1e-5)


def test_without_the_kl_budget_term_uniform_weights_are_optimal() -> None:
    """Σ_i KL(q_w || p_i) on the log-linear family is minimised by the uniform average: why dynamic
    fusion needs the KL-constrained form to adapt at all."""
    ts = _random_teachers(rows=8)
    g = torch.Generator().manual_seed(3)
    uni = fusion_objective(ts, torch.full((8, 3), 1 / 3), 1.0, 0.0)
    for _ in range(20):
        w = torch.rand(8, 3, generator=g)
        w = w / w.sum(1, keepdim=True)
        assert bool((fusion_objective(ts, w, 1.0, 0.0) >= uni - 1e-5).all())
    fused, w = fuse_dynamic(ts, 1.0, 50, sharpness=0.0)
    assert torch.allclose(w, torch.full((8, 3), 1 / 3), atol=1e-3)  # at the optimum up to float round-off
    assert torch.allclose(fused, fuse_uniform(ts)[0], atol=1e-2)


@pytest.mark.parametrize("T,lam", [(1.0, 0.5), (2.0, 0.25), (0.5, 0.9)])
def test_dynamic_weights_are_on_the_simplex_and_never_worse_than_uniform(T: float, lam: float) -> None:
    ts = _random_teachers(rows=32, seed=7)
    fused, w = fuse_dynamic(ts, T, 30, sharpness=lam)
    assert w.shape == (32, 3) and bool((w >= 0).all())
    assert torch.allclose(w.sum(1), torch.ones(32), atol=1e-5)
    assert torch.allclose(fused, torch.einsum("ni,inc->nc", w, torch.stack(ts)), atol=1e-5)
    j_dyn = fusion_objective(ts, w, T, lam)
    j_uni = fusion_objective(ts, torch.full_like(w, 1 / 3), T, lam)
    assert bool((j_dyn <= j_uni + 1e-6).all())


def test_dynamic_fusion_leans_on_the_agreeing_expert() -> None:
    fused, w = fuse_dynamic(TEACHERS3, temperature=1.0, steps=50, sharpness=0.5)
    uni, wu = fuse_uniform(TEACHERS3)
    j_dyn = float(fusion_objective(TEACHERS3, w, 1.0, 0.5))
    j_uni = float(fusion_objective(TEACHERS3, wu, 1.0, 0.5))
    assert j_dyn < j_uni - 1e-3  # strictly better objective than the uniform average
    assert float(w[0, 0]) > max(1 / 3, float(w[0, 1]))  # most weight on the expert that agrees with the generalist
    assert int(fused.argmax(1)) == 0
    assert float(F.softmax(fused, 1)[0, 0]) > float(F.softmax(uni, 1)[0, 0])  # a more decided answer
    # a different starting point (the spec's weights) converges to a point that is no worse than its start
    _, w2 = fuse_dynamic(TEACHERS3, 1.0, 50, 0.5, init=[0.1, 0.1, 0.8])
    start = torch.tensor([[0.1, 0.1, 0.8]])
    assert float(fusion_objective(TEACHERS3, w2, 1.0, 0.5)) <= float(fusion_objective(TEACHERS3, start, 1.0, 0.5))


def test_fuse_dispatch() -> None:
    ts = _random_teachers()
    assert torch.equal(fuse(ts, "static", [0.0, 1.0, 0.0])[0], ts[1])
    assert torch.allclose(fuse(ts, "uniform")[0], fuse_uniform(ts)[0])
    assert fuse(ts, "dynamic", steps=5)[1].shape == (16, 3)
    with pytest.raises(ValueError):
        fuse(ts, "static")
    with pytest.raises(ValueError):
        fuse(ts, "median")


# --- the fused teacher cache -----------------------------------------------------------------------


def _source(ids: list[str]) -> SourceData:
    n = len(ids)
    table = pa.table(
        {
            "id": pa.array(ids),
            "x": to_fixed_list(np.zeros((n, 2), np.float32)),
            "label": pa.array(np.arange(n) % 4, pa.int64()),
            "split": pa.array(["test"] * n),
            "labeled": pa.array([True] * n),
        }
    )
    return SourceData(table, "features", 2, 4, f"src-{n}", ["mem"])


def _write_member(
    root: Path, tid: str, ids: list[str], logits: np.ndarray, topk: int | None = None, cache: TeacherCache | None = None
) -> TeachResult:
    cache = cache or TeacherCache(root / tid / f"fp-{tid}")
    cols: dict[str, pa.Array] = {"id": pa.array(ids)}
    if topk is None:
        cols["logits"] = to_fixed_list(logits.astype(np.float32))
    else:
        idx, val, tail = topk_compress(logits, topk)
        cols.update(topk_idx=to_fixed_list(idx), topk_val=to_fixed_list(val), tail_lse=pa.array(tail))
    with cache.staging() as staging:
        pq.write_table(pa.table(cols), staging / "part-0.parquet")
        cache.commit(staging, {"teacher_id": tid, "fingerprint": f"fp-{tid}"}, "src")
    return TeachResult(tid, cache, f"fp-{tid}", len(ids), False)


def _cfg(tmp_path: Path, **fusion):
    o = {
        "storage": str(tmp_path),
        "teach.fusion": {"mode": "dynamic", "teachers": ["expert_0_4", "expert_5_9", "generalist"], **fusion},
    }
    return load_spec("pipelines/digits_fusion.yaml", o)


def _members(tmp_path: Path, ids: list[str], seed: int = 0, topk_last: bool = False):
    rng = np.random.default_rng(seed)
    logits = {
        t: (rng.normal(size=(len(ids), 4)) * 3).astype(np.float32) for t in ("expert_0_4", "expert_5_9", "generalist")
    }
    root = tmp_path / "cache"
    res = {
        t: _write_member(root, t, ids, z, topk=(2 if topk_last and t == "generalist" else None))
        for t, z in logits.items()
    }
    return res, logits


def test_fuse_caches_writes_reuses_refuses_extends_and_joins(ray_local, tmp_path: Path) -> None:
    """One fused cache through its life: written, reused, a source with rows a member lacks
    refused (nothing published), extended by new rows only, then joined like any teacher."""
    from kdpipe.evaluate import teacher_accuracy_ds
    from kdpipe.views import build_views

    ids = [f"r{i}" for i in range(10)]
    cfg = _cfg(tmp_path)
    results, logits = _members(tmp_path, ids)
    r = fuse_caches(cfg, _source(ids), results)
    assert r.teacher_id == "fused" and not r.reused and r.rows_taught == 10
    assert r.cache.dir == tmp_path / "cache" / "fused" / r.fingerprint
    m = r.manifest()
    assert (
        m["teacher_id"] == "fused"
        and m["members"] == {t: f"fp-{t}" for t in logits}
        and m["fusion"]["mode"] == "dynamic"
    )
    assert set(m["schema"]) == {"id", "logits", "weights"} and m["rows"] == 10
    table = r.cache.read()
    order = {rid: i for i, rid in enumerate(table["id"].to_pylist())}
    got = to_numpy(table["logits"])[[order[i] for i in ids]]
    want, w = fuse(
        [logits[t] for t in ("expert_0_4", "expert_5_9", "generalist")], "dynamic", steps=cfg.teach.fusion.steps
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    weights = to_numpy(table["weights"])
    assert weights.shape == (10, 3) and np.allclose(weights.sum(1), 1.0, atol=1e-5) and (weights >= 0).all()

    # same members, same config: reused, nothing computed
    again = fuse_caches(cfg, _source(ids), results)
    assert again.reused and again.rows_taught == 0 and again.fingerprint == r.fingerprint

    # a source row no member holds: refused, and nothing is published
    with pytest.raises(RuntimeError, match="lack 1 of 1 rows"):
        fuse_caches(cfg, _source(ids + ["extra"]), results)
    assert r.manifest()["rows"] == 10 and len(r.manifest()["parts"]) == 1
    without = {k: v for k, v in results.items() if k != "generalist"}
    with pytest.raises(KeyError, match="generalist"):
        fuse_caches(cfg, _source(ids), without)

    # new source rows: the members grow a part each, the fused cache only computes the new rows
    new = [f"r{i}" for i in range(10, 13)]
    rng = np.random.default_rng(1)
    for t, res in results.items():
        _write_member(tmp_path / "cache", t, new, (rng.normal(size=(3, 4)) * 3).astype(np.float32), cache=res.cache)
    src = _source(ids + new)
    grown = fuse_caches(cfg, src, results)
    assert not grown.reused and grown.rows_taught == 3 and grown.fingerprint == r.fingerprint
    assert grown.manifest()["rows"] == 13 and len(grown.manifest()["parts"]) == 2
    assert sorted(grown.cache.ids()) == sorted(ids + new)

    # the fused cache joins into the distil views like any teacher's
    test = build_views(src, {**{k: v.cache for k, v in results.items()}, "fused": grown.cache}).test
    assert {"fused.logits", "fused.weights"} <= set(test.columns())
    acc = teacher_accuracy_ds(test, "fused")
    assert acc is not None and 0.0 <= acc <= 1.0 and not math.isnan(acc)


def test_fused_fingerprint_covers_config_and_members(tmp_path: Path) -> None:
    from kdpipe.fuse_stage import fused_fingerprint

    results = {
        t: TeachResult(t, TeacherCache(tmp_path / t), f"fp-{t}", 0, True)
        for t in ("expert_0_4", "expert_5_9", "generalist")
    }
    dyn = fused_fingerprint(_cfg(tmp_path), results)
    assert dyn == fused_fingerprint(_cfg(tmp_path), dict(results))
    assert fused_fingerprint(_cfg(tmp_path, mode="uniform"), results) != dyn
    assert fused_fingerprint(_cfg(tmp_path, steps=7), results) != dyn
    results["generalist"] = TeachResult("generalist", results["generalist"].cache, "fp-retrained", 0, True)
    assert fused_fingerprint(_cfg(tmp_path), results) != dyn


def test_static_fused_cache_equals_the_chosen_teacher_and_reads_topk_members(ray_local, tmp_path: Path) -> None:
    ids = [f"r{i}" for i in range(8)]
    results, logits = _members(tmp_path, ids, topk_last=True)
    r = fuse_caches(_cfg(tmp_path, mode="static", weights=[0.0, 1.0, 0.0]), _source(ids), results)
    t = r.cache.read()
    order = [t["id"].to_pylist().index(i) for i in ids]
    np.testing.assert_allclose(to_numpy(t["logits"])[order], logits["expert_5_9"], rtol=1e-6)
    # the generalist has only a top-2 cache: it is rebuilt densely (tail spread uniformly) for fusion
    g = fuse_caches(_cfg(tmp_path, mode="static", weights=[0.0, 0.0, 1.0]), _source(ids), results).cache.read()
    dense = to_numpy(g["logits"])[[g["id"].to_pylist().index(i) for i in ids]]
    np.testing.assert_array_equal(dense.argmax(1), logits["generalist"].argmax(1))
    assert np.allclose(np.log(np.exp(dense).sum(1)), np.log(np.exp(logits["generalist"]).sum(1)), atol=1e-2)
