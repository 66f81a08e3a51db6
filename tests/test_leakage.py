"""The guarantees the comparisons rest on: hidden labels stay hidden, teachers train on train rows only,
saved teachers are not reused under other settings, and a tie never moves the alias."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from kdpipe.config import GateConfig, KdpipeError, SourceConfig, TeacherConfig
from kdpipe.data import hide_unlabeled, split_tables
from kdpipe.model_registry import evaluate_gates
from kdpipe.sources import load_source
from teachers.mlp import MLPTeacher


def test_unlabeled_train_rows_reach_the_student_without_labels() -> None:
    src = load_source(SourceConfig(kind="sklearn_digits"))
    splits = split_tables(hide_unlabeled(src.table))
    train = splits["train"]
    hidden = pc.invert(train["labeled"])
    assert pc.all(pc.equal(train.filter(hidden)["label"], -1)).as_py()
    assert pc.all(pc.greater_equal(train.filter(train["labeled"])["label"], 0)).as_py()
    assert train.filter(hidden).num_rows > 0.8 * train.num_rows  # labeled_fraction 0.1
    for s in ("val", "test"):  # evaluation rows keep their labels and are not train rows
        assert pc.all(pc.greater_equal(splits[s]["label"], 0)).as_py()
        assert not set(splits[s]["id"].to_pylist()) & set(train["id"].to_pylist())


def test_teacher_trains_on_labeled_train_rows_only(tmp_path: Path, monkeypatch) -> None:
    src = load_source(SourceConfig(kind="sklearn_digits"))
    seen: list[int] = []
    import torch

    real = torch.tensor

    def spy(data, *a, **k):  # the teacher's training tensors are built from exactly these rows
        out = real(data, *a, **k)
        if out.ndim == 2 and out.shape[1] == 64:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch, "tensor", spy)
    cfg = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "t"), params={"hidden": [8], "epochs": 1})
    MLPTeacher.prepare(cfg, src)
    t = src.table
    labeled_train = t.filter(pc.and_(pc.equal(t["split"], "train"), t["labeled"])).num_rows
    assert seen == [labeled_train]


def test_saved_teacher_is_not_reused_under_other_params_or_split(tmp_path: Path) -> None:
    src = load_source(SourceConfig(kind="sklearn_digits"))
    cfg = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "t"), params={"hidden": [8], "epochs": 1})
    MLPTeacher.prepare(cfg, src)
    MLPTeacher.prepare(cfg, src)  # same settings: reused
    other = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "t"), params={"hidden": [16], "epochs": 1})
    with pytest.raises(KdpipeError, match="trained with params"):
        MLPTeacher.prepare(other, src)
    resplit = load_source(SourceConfig(kind="sklearn_digits", split={"salt": "other"}))
    with pytest.raises(KdpipeError, match="val/test rows"):
        MLPTeacher.prepare(cfg, resplit)


def test_tie_with_champion_keeps_the_alias() -> None:
    gates = GateConfig(metric="test_acc", min_gain_over_baseline=None)
    assert not evaluate_gates({"test_acc": 0.9}, gates, None, champion=0.9).passed
    assert evaluate_gates({"test_acc": 0.91}, gates, None, champion=0.9).passed
    assert evaluate_gates({"test_acc": 0.9}, GateConfig(min_gain_over_baseline=0.0), baseline=0.9, champion=None).passed
