"""The numbers behind the run page's figures, checked by hand, and the figures as MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from kdpipe import figures
from kdpipe.evaluate import class_arrays, expected_calibration_error, teacher_sums
from kdpipe.teach import topk_compress


def test_confusion_and_calibration_sums_by_hand() -> None:
    conf = np.array([0.95, 0.55, 0.15, 0.99])
    pred = np.array([0, 1, 2, 1])
    labels = np.array([0, 2, -1, 1])  # the third row is unlabeled: not counted
    a = class_arrays(conf, pred, labels, 3)
    want = np.zeros((3, 3))
    want[0, 0] = want[2, 1] = want[1, 1] = 1
    np.testing.assert_array_equal(a["confusion"], want)
    assert a["calib_n"][9] == 2 and a["calib_n"][5] == 1 and a["calib_n"].sum() == 3
    assert a["calib_correct"][9] == 2 and a["calib_correct"][5] == 0
    assert a["calib_conf"][9] == pytest.approx(1.94)
    # ECE = (|2 − 1.94| + |0 − 0.55|) / 3
    assert expected_calibration_error(a) == pytest.approx((0.06 + 0.55) / 3)


def test_teacher_confidence_from_top_k_and_tail_equals_the_dense_softmax() -> None:
    """The cached top-k with its tail bucket gives the same top-1 probability as the full logits."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=64)
    idx, val, tail = topk_compress(logits, 4)
    dense = teacher_sums({"label": labels, "t.logits": logits}, "t", 10)
    sparse = teacher_sums({"label": labels, "t.topk_idx": idx, "t.topk_val": val.astype(np.float32),
                           "t.tail_lse": tail}, "t", 10)
    assert dense["correct"] == sparse["correct"] == float((logits.argmax(1) == labels).sum())
    np.testing.assert_array_equal(dense["confusion"], sparse["confusion"])
    # fp16 top-k values: confidence agrees to fp16 precision
    assert sparse["calib_conf"].sum() == pytest.approx(dense["calib_conf"].sum(), rel=2e-3)


def test_figures_are_logged_as_png_artifacts(tmp_path: Path) -> None:
    from kdpipe.tracking import TrackedRun

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    rng = np.random.default_rng(1)
    arrays = {p: class_arrays(rng.uniform(0.1, 1, 200), rng.integers(0, 5, 200), rng.integers(0, 5, 200), 5)
              for p in ("test_", "baseline_test_", "teacher_t_test_")}
    arrays["test_"]["cos_hist"] = np.histogram(rng.uniform(0.5, 1, 100), bins=40, range=(-1, 1))[0].astype(float)
    history = {"student": {"train_loss": [(0, 2.0), (1, 1.0)], "train_kd": [(0, 1.5), (1, 0.7)],
                           "val_acc": [(0, 0.5), (1, 0.7)]},
               "baseline": {"train_loss": [(0, 2.2), (1, 1.4)], "val_acc": [(0, 0.4), (1, 0.5)]}}
    with TrackedRun(uri, "figs", "figs", {}, system_metrics=False) as run:
        drawn = {"curves.png": figures.training_curves(history),
                 "bars.png": figures.gate_bars({"teacher t": 0.9, "student (kd)": 0.85, "baseline twin (ce)": 0.7}, "test_acc"),
                 "confusion.png": figures.confusion(arrays), "reliability.png": figures.reliability(arrays),
                 "cosine.png": figures.cosine_hist(arrays)}
        assert len(drawn["curves.png"].axes) == 4  # (student, baseline) x (losses, validation)
        assert len(drawn["confusion.png"].axes) == 3  # teacher, student and a colour bar; not the twin
        legend = [t.get_text() for t in drawn["reliability.png"].axes[0].get_legend().get_texts()]
        assert legend[0] == "calibrated" and any(t.startswith("teacher t (ECE ") for t in legend)
        for name, fig in drawn.items():
            run.log_figure(fig, f"figures/{name}")
            figures.close(fig)
    client = MlflowClient(uri)
    for name in drawn:
        local = client.download_artifacts(run.run_id, f"figures/{name}", str(tmp_path / "dl"))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures.confusion({}) is None and figures.cosine_hist(arrays | {"test_": {}}) is None
