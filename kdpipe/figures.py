"""The pictures on a run's MLflow page: how the student learned and how it compares.

Every figure is drawn from what the run already recorded (metric histories) or what evaluation
summed on the workers (confusion counts, calibration bins, cosine histograms: `Scored.arrays`),
so drawing needs no rows. Matplotlib's Agg backend: no display needed, on a cluster head too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdpipe.evaluate import expected_calibration_error

MODEL_NAMES = {"test_": "student", "baseline_test_": "baseline twin", "champion_test_": "champion"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(prefix: str) -> str:
    """A metric prefix as a legend entry: `test_` -> student, `teacher_t_test_` -> teacher t."""
    if prefix.startswith("teacher_"):
        return "teacher " + prefix.removeprefix("teacher_").removesuffix("_test_")
    return MODEL_NAMES.get(prefix, prefix.rstrip("_"))


def training_curves(history: dict[str, dict[str, list[tuple[int, float]]]]) -> Any:
    """One row per trained model (`{title: {metric: [(epoch, value)]}}`): every loss part on the
    left (log scale), the validation metrics on the right."""
    plt = _plt()
    fig, axes = plt.subplots(len(history), 2, figsize=(10, 3.2 * len(history)), squeeze=False)
    for row, (title, metrics) in zip(axes, history.items()):
        for name, points in sorted(metrics.items()):
            ax = row[0] if name.startswith("train_") else row[1]
            steps, values = zip(*sorted(points)) if points else ((), ())
            ax.plot(np.asarray(steps) + 1, values, marker="." if len(steps) < 30 else None, label=name)
        row[0].set_title(f"{title}: training losses")
        row[0].set_yscale("log")
        row[1].set_title(f"{title}: validation")
        for ax in row:
            ax.set_xlabel("epoch")
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gate_bars(rows: dict[str, Any], metric: str) -> Any:
    """Teacher(s), student, twin and champion on the gate metric, one bar each."""
    plt = _plt()
    items = [(k, float(v)) for k, v in rows.items() if isinstance(v, (int, float)) and np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.2))
    names, values = zip(*items) if items else ((), ())
    bars = ax.barh(range(len(items)), values, color=[_colour(n) for n in names])
    ax.set_yticks(range(len(items)), names)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)
    ax.set_xlabel(metric)
    lo = min(values, default=0.0)
    ax.set_xlim(min(0.0, lo), max(values, default=1.0) * 1.12 or 1.0)
    ax.set_title(f"held-out {metric}")
    fig.tight_layout()
    return fig


def _colour(name: str) -> str:
    for key, colour in (("teacher", "#4c72b0"), ("student", "#dd8452"), ("baseline", "#8c8c8c"), ("champion", "#55a868")):
        if name.startswith(key):
            return colour
    return "#937860"


def confusion(arrays: dict[str, dict[str, np.ndarray]]) -> Any | None:
    """Row-normalised confusion matrices (true class down, predicted across) of every teacher and
    the student."""
    panels = [(p, a["confusion"]) for p, a in arrays.items() if "confusion" in a
              and (p.startswith("teacher_") or p == "test_")]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (prefix, cm) in zip(axes[0], panels):
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{label(prefix)} (acc {acc:.3f})")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return fig


def reliability(arrays: dict[str, dict[str, np.ndarray]]) -> Any | None:
    """Reliability diagram: accuracy against confidence per bin for every model with calibration
    sums; the diagonal is a perfectly calibrated model."""
    curves = [(p, a) for p, a in arrays.items() if "calib_n" in a and a["calib_n"].sum() > 0]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="calibrated")
    for prefix, a in curves:
        keep = a["calib_n"] > 0
        conf = a["calib_conf"][keep] / a["calib_n"][keep]
        acc = a["calib_correct"][keep] / a["calib_n"][keep]
        ax.plot(conf, acc, marker="o", label=f"{label(prefix)} (ECE {expected_calibration_error(a):.3f})")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability")
    fig.tight_layout()
    return fig


def cosine_hist(arrays: dict[str, dict[str, np.ndarray]]) -> Any | None:
    """Distribution of each embedding model's per-row cosine to its teacher."""
    hists = [(p, a["cos_hist"]) for p, a in arrays.items() if "cos_hist" in a and a["cos_hist"].sum() > 0]
    if not hists:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for prefix, h in hists:
        edges = np.linspace(-1.0, 1.0, len(h) + 1)
        ax.stairs(h / h.sum(), edges, label=label(prefix), lw=1.5)
    ax.set_xlabel("cosine(student embedding, teacher embedding)")
    ax.set_ylabel("fraction of test rows")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("agreement with the teacher, per row")
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    _plt().close(fig)
