"""The guarantees the comparisons rest on: hidden labels stay hidden, teachers train on train rows only,
saved teachers are not reused under other settings, and a tie never moves the alias."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from kdpipe.config import GateConfig, KdpipeError, SourceConfig, TeacherConfig
from kdpipe.data import load_source
from kdpipe.model_registry import evaluate_gates
from teachers.mlp import MLPTeacher


def test_unlabeled_train_rows_reach_the_student_without_labels(ray_local) -> None:
    """The views the student trains on: labels of train rows outside the labeled subset are -1,
    the labeled ones and every val/test label are intact, and each row is in one split only."""
    import numpy as np

    from kdpipe.views import build_views

    src = load_source(SourceConfig(kind="sklearn_digits", split={"labeled_fraction": 0.1}))
    views = build_views(src, {})
    index = src.index
    for split in ("train", "val", "test"):
        rows = index.filter(pc.equal(index["split"], split))
        labels = views[split].take_batch(10_000, batch_format="numpy")["label"]
        assert len(labels) == rows.num_rows == views.rows[split]
        visible = np.sort(labels[labels >= 0])
        want = rows.filter(rows["labeled"])["label"].to_numpy() if split == "train" else rows["label"].to_numpy()
        assert np.array_equal(visible, np.sort(want))  # exactly the labeled rows' labels, nothing else
        if split == "train":
            assert (labels == -1).sum() > 0.8 * len(labels)  # labeled_fraction 0.1
    assert sum(views.rows.values()) == index.num_rows == len(set(index["id"].to_pylist()))


def test_teacher_trains_on_labeled_train_rows_only(ray_local, tmp_path: Path, monkeypatch) -> None:
    src = load_source(SourceConfig(kind="sklearn_digits", split={"labeled_fraction": 0.1}))
    seen: list[int] = []
    import torch

    real = torch.tensor

    def spy(data, *a, **k):  # the teacher's training tensors are built from exactly these rows
        out = real(data, *a, **k)
        if out.ndim == 2 and out.shape[1] == 64:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch, "tensor", spy)
    cfg = TeacherConfig(id="t", kind="mlp_classifier", params={"hidden": [8], "epochs": 1})
    MLPTeacher.prepare(cfg, src, str(tmp_path))
    t = src.table
    labeled_train = t.filter(pc.and_(pc.equal(t["split"], "train"), t["labeled"])).num_rows
    assert seen == [labeled_train]


def test_teacher_at_a_given_path_is_not_reused_under_other_params_or_rows(ray_local, tmp_path: Path) -> None:
    src = load_source(SourceConfig(kind="sklearn_digits"))
    cfg = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "t"), params={"hidden": [8], "epochs": 1})
    MLPTeacher.prepare(cfg, src, str(tmp_path))
    stamp = (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns
    MLPTeacher.prepare(cfg, src, str(tmp_path))  # same settings, same rows: reused
    assert (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns == stamp
    other = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "t"), params={"hidden": [16], "epochs": 1})
    with pytest.raises(KdpipeError, match="its params differ"):
        MLPTeacher.prepare(other, src, str(tmp_path))
    resplit = load_source(SourceConfig(kind="sklearn_digits", split={"salt": "other"}))
    with pytest.raises(KdpipeError, match="are val/test rows of this source"):
        MLPTeacher.prepare(cfg, resplit, str(tmp_path))


def test_teacher_under_storage_is_trained_again_for_other_rows_and_says_why(ray_local, tmp_path: Path, caplog) -> None:
    """Without a `path:` the teacher lives under the storage root with the ids it was fitted on: a
    source split another way gets a teacher of its own (with a line saying why), and the first
    one is still there for runs over the first split."""
    import logging

    cfg = TeacherConfig(id="t", kind="mlp_classifier", params={"hidden": [8], "epochs": 1})
    first = MLPTeacher.prepare(cfg, load_source(SourceConfig(kind="sklearn_digits")), str(tmp_path))
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        second = MLPTeacher.prepare(
            cfg, load_source(SourceConfig(kind="sklearn_digits", split={"salt": "other"})), str(tmp_path)
        )
    assert first.path != second.path and Path(first.path, "model.safetensors").exists()
    assert Path(second.path).parent == tmp_path / "teachers" / "mlp_classifier"
    assert "training a new copy" in caplog.text and "are val/test rows of this source" in caplog.text
    again = MLPTeacher.prepare(cfg, load_source(SourceConfig(kind="sklearn_digits")), str(tmp_path))
    assert again.path == first.path  # the first split's teacher, reused


def test_tie_with_champion_keeps_the_alias() -> None:
    gates = GateConfig(metric="test_acc", min_gain_over_baseline=None)
    assert not evaluate_gates({"test_acc": 0.9}, gates, None, champion=0.9).passed
    assert evaluate_gates({"test_acc": 0.91}, gates, None, champion=0.9).passed
    assert evaluate_gates({"test_acc": 0.9}, GateConfig(min_gain_over_baseline=0.0), baseline=0.9, champion=None).passed


def test_min_value_gate_blocks_below_and_passes_at_the_floor() -> None:
    gates = GateConfig(metric="test_acc", min_value=0.8, min_gain_over_baseline=None)
    low = evaluate_gates({"test_acc": 0.79}, gates, baseline=None, champion=None)
    assert not low.passed and low.checks["min_value"]["threshold"] == 0.8 and "min_value" in low.reasons()
    assert evaluate_gates({"test_acc": 0.8}, gates, baseline=None, champion=None).passed
    # every gate must pass: a floor met does not excuse losing to the baseline
    both = GateConfig(metric="test_acc", min_value=0.5, min_gain_over_baseline=0.01)
    assert not evaluate_gates({"test_acc": 0.9}, both, baseline=0.895, champion=None).passed
