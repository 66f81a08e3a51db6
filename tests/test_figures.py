"""The numbers behind the run page's figures, checked by hand, and the figures as MLflow artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from kdpipe import figures
from kdpipe.evaluate import teacher_sums
from kdpipe.evaluators.base import class_arrays, expected_calibration_error
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
    sparse = teacher_sums(
        {"label": labels, "t.topk_idx": idx, "t.topk_val": val.astype(np.float32), "t.tail_lse": tail}, "t", 10
    )
    assert dense["correct"] == sparse["correct"] == float((logits.argmax(1) == labels).sum())
    np.testing.assert_array_equal(dense["confusion"], sparse["confusion"])
    # fp16 top-k values: confidence agrees to fp16 precision
    assert sparse["calib_conf"].sum() == pytest.approx(dense["calib_conf"].sum(), rel=2e-3)


def test_figures_are_logged_as_png_artifacts(tmp_path: Path) -> None:
    from kdpipe.tracking import TrackedRun

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    rng = np.random.default_rng(1)
    arrays = {
        p: class_arrays(rng.uniform(0.1, 1, 200), rng.integers(0, 5, 200), rng.integers(0, 5, 200), 5)
        for p in ("test_", "baseline_test_", "teacher_t_test_")
    }
    arrays["test_"]["cos_hist"] = np.histogram(rng.uniform(0.5, 1, 100), bins=40, range=(-1, 1))[0].astype(float)
    history = {
        "student": {
            "train_loss": [(0, 2.0), (1, 1.0)],
            "train_kd": [(0, 1.5), (1, 0.7)],
            "val_acc": [(0, 0.5), (1, 0.7)],
        },
        "baseline": {"train_loss": [(0, 2.2), (1, 1.4)], "val_acc": [(0, 0.4), (1, 0.5)]},
    }
    with TrackedRun(uri, "figs", "figs", {}, system_metrics=False) as run:
        drawn = {
            "curves.png": figures.training_curves(history),
            "bars.png": figures.gate_bars(
                {"teacher t": 0.9, "student (kd)": 0.85, "baseline twin (ce)": 0.7}, "test_acc"
            ),
            "confusion.png": figures.confusion(arrays),
            "reliability.png": figures.reliability(arrays),
            "cosine.png": figures.cosine_hist(arrays),
        }
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


def _confusion_arrays(n: int, prefixes: tuple[str, ...], rows: int = 600) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(n)
    out = {}
    for p in prefixes:
        labels = rng.integers(0, n, rows)
        pred = np.where(rng.uniform(size=rows) < 0.7, labels, rng.integers(0, n, rows))
        out[p] = class_arrays(rng.uniform(0.1, 1, rows), pred, labels, n)
    return out


def _texts(fig: Any) -> list[tuple[str, Any]]:
    """Every drawn, non-empty text of a figure with its window extent: titles, axis labels, tick
    labels inside the axis' range (a locator's off-view ticks are not drawn), cell and bar texts."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        box = ax.get_window_extent(r)
        parts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, lo, hi, centre in (
            (ax.xaxis, box.x0, box.x1, lambda b: (b.x0 + b.x1) / 2),
            (ax.yaxis, box.y0, box.y1, lambda b: (b.y0 + b.y1) / 2),
        ):
            for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True):
                if t.get_visible() and t.get_text() and lo - 1 <= centre(t.get_window_extent(r)) <= hi + 1:
                    parts.append(t)
        out += [(f"{t.get_text()!r}", t.get_window_extent(r)) for t in parts if t.get_visible() and t.get_text()]
    return out


def _overlaps(fig: Any) -> list[tuple[str, str]]:
    texts = _texts(fig)
    b = np.array([[e.x0, e.y0, e.x1, e.y1] for _, e in texts]) + np.array([0.5, 0.5, -0.5, -0.5])
    hit = (
        (b[:, None, 0] < b[None, :, 2])
        & (b[None, :, 0] < b[:, None, 2])
        & (b[:, None, 1] < b[None, :, 3])
        & (b[None, :, 1] < b[:, None, 3])
    )
    return [(texts[i][0], texts[j][0]) for i, j in zip(*np.nonzero(np.triu(hit, 1)))]


def _panels(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.images]


@pytest.mark.parametrize("names", [None, ["cat", "dog", "bird", "horse", "fish", "mouse"]])
def test_confusion_ticks_every_class_and_counts_in_every_cell(names: list[str] | None) -> None:
    """Six classes: one tick per class id (never 2.5) or its name, and each cell's count written
    in it, zeros too, white on the dark diagonal and black on the light cells."""
    arrays = _confusion_arrays(6, ("test_", "teacher_t_test_"))
    arrays["test_"]["confusion"][2, 3] = 0
    fig = figures.confusion(arrays, class_names=names)
    want = names or [str(i) for i in range(6)]
    for ax, prefix in zip(_panels(fig), ("test_", "teacher_t_test_")):
        assert list(ax.get_xticks()) == list(range(6)) and list(ax.get_yticks()) == list(range(6))
        assert [t.get_text() for t in ax.get_xticklabels()] == want
        assert [t.get_text() for t in ax.get_yticklabels()] == want
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
        cm = arrays[prefix]["confusion"]
        assert {k: t.get_text() for k, t in cells.items()} == {(i, j): str(int(v)) for (i, j), v in np.ndenumerate(cm)}
        assert cells[(0, 0)].get_color() == "white" and cells[(0, 1)].get_color() == "black"
        assert prefix != "test_" or cells[(2, 3)].get_text() == "0"
    assert _overlaps(fig) == []
    figures.close(fig)


def test_confusion_with_many_classes_and_long_names_stays_legible(tmp_path: Path) -> None:
    """45 classes (the WordNet categories): every class gets a tick, labelled by its name when
    the names match the class count and by its id when they do not; zeros are left blank; a long
    teacher name wraps instead of running into the next panel's title; no text overlaps."""
    n = 45
    names = [f"noun.category{i}" if i % 2 else f"verb.communication{i}" for i in range(n)]
    arrays = _confusion_arrays(n, ("test_", "teacher_t_test_", "teacher_a-very-long-teacher-model-name-v2_test_"))
    for class_names, want in ((names, names), (names[:-1], [str(i) for i in range(n)])):
        fig = figures.confusion(arrays, class_names=class_names)
        panels = _panels(fig)
        assert len(panels) == 3 and len(fig.axes) == 4
        for ax in panels:
            assert [t.get_text() for t in ax.get_xticklabels()] == want
            assert [t.get_text() for t in ax.get_yticklabels()] == want
        cm = arrays["test_"]["confusion"]
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in panels[0].texts}
        assert texts == {(i, j): str(int(v)) for (i, j), v in np.ndenumerate(cm) if v}
        assert _overlaps(fig) == []
        fig.savefig(tmp_path / "confusion.png")
        figures.close(fig)


def test_confusion_counts_are_shortened_only_when_large() -> None:
    assert figures._count(12345.0, False) == "12345" and figures._count(999.0, True) == "999"
    assert [figures._count(v, True) for v in (1234.0, 9990.0, 12345.0, 2.5e6)] == ["1.2k", "10k", "12k", "2.5M"]


def test_other_figures_have_whole_epoch_ticks_and_no_overlapping_text() -> None:
    """Two epochs give ticks 1 and 2 (not 1.2, 1.4, …); a negative bar's value label stays inside
    the axes, clear of the model names; the reliability legend leaves an underconfident model's
    points visible."""
    history = {
        "student": {
            "train_loss": [(0, 0.9), (1, 0.7)],
            "train_kd": [(0, 0.8), (1, 0.6)],
            "val_acc": [(0, 0.5), (1, 0.7)],
        },
        "baseline": {"train_loss": [(0, 2.2), (1, 1.4), (2, 1.3)], "val_acc": [(0, 0.4), (1, 0.5), (2, 0.55)]},
    }
    fig = figures.training_curves(history)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        shown = [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi]
        assert shown and all(s.isdigit() for s in shown), shown
    assert _overlaps(fig) == []
    figures.close(fig)
    assert figures.training_curves({}) is None

    fig = figures.gate_bars({"teacher t": 0.31, "student (kd)": -0.12, "baseline twin (ce)": -0.4}, "test_cos")
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_window_extent()
    assert len(ax.texts) == 3
    for t in ax.texts:
        e = t.get_window_extent()
        assert box.x0 <= e.x0 and e.x1 <= box.x1, t.get_text()
    assert _overlaps(fig) == []
    figures.close(fig)

    n = np.zeros(10)
    n[[2, 3]] = 100
    under = {"calib_n": n, "calib_conf": n * np.linspace(0.05, 0.95, 10), "calib_correct": n * 0.95}
    fig = figures.reliability({"test_": under, "teacher_t_test_": under | {"calib_correct": n * 0.3}})
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    for line in ax.get_lines()[1:]:
        for x, y in ax.transData.transform(line.get_xydata()):
            assert not legend.contains(x, y)
    assert _overlaps(fig) == []
    figures.close(fig)

    rng = np.random.default_rng(2)
    arrays = {"test_": {"cos_hist": np.histogram(rng.uniform(0.5, 1, 100), bins=40, range=(-1, 1))[0].astype(float)}}
    fig = figures.cosine_hist(arrays)
    assert _overlaps(fig) == []
    figures.close(fig)
