"""The pictures on a run's MLflow page: how the student learned and how it compares.

Every figure is drawn from what the run already recorded (metric histories) or what evaluation
summed on the workers (confusion counts, calibration bins, cosine histograms: `Scored.arrays`),
so drawing needs no rows. Matplotlib's Agg backend: no display needed, on a cluster head too.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from kdpipe.evaluators.base import expected_calibration_error

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


def training_curves(history: dict[str, dict[str, list[tuple[int, float]]]]) -> Any | None:
    """One row per trained model (`{title: {metric: [(epoch, value)]}}`): every loss part on the
    left (log scale), the validation metrics on the right. Epochs are whole numbers: the x ticks
    are too, however few epochs ran."""
    if not history:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gate_bars(rows: dict[str, Any], metric: str) -> Any:
    """Teacher(s), student, twin and champion on the gate metric, one bar each. The x range pads
    both ends by the span, so a value label fits beside its bar on either side of zero (a cosine
    can be negative)."""
    plt = _plt()
    items = [(k, float(v)) for k, v in rows.items() if isinstance(v, (int, float)) and np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.2))
    names, values = zip(*items) if items else ((), ())
    bars = ax.barh(range(len(items)), values, color=[_colour(n) for n in names])
    ax.set_yticks(range(len(items)), names)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)
    ax.set_xlabel(metric)
    lo, hi = min(0.0, *values), max(0.0, *values)
    pad = 0.15 * ((hi - lo) or 1.0)
    ax.set_xlim(lo - pad if lo < 0 else 0.0, hi + pad if hi > 0 or lo == 0 else 0.0)
    ax.set_title(f"held-out {metric}")
    fig.tight_layout()
    return fig


def _colour(name: str) -> str:
    for key, colour in (
        ("teacher", "#4c72b0"),
        ("student", "#dd8452"),
        ("baseline", "#8c8c8c"),
        ("champion", "#55a868"),
    ):
        if name.startswith(key):
            return colour
    return "#937860"


def confusion(arrays: dict[str, dict[str, np.ndarray]], class_names: list[str] | None = None) -> Any | None:
    """Confusion matrices of every teacher and the student (true class down, predicted across):
    colour is the row-normalised share, so rare classes read as well as common ones; the text is
    the count, so a share of a handful of rows is not mistaken for a trend. `class_names` (one per
    class, in id order) label the axes; otherwise the class ids do."""
    panels = [
        (p, a["confusion"])
        for p, a in arrays.items()
        if "confusion" in a and (p.startswith("teacher_") or p == "test_")
    ]
    if not panels:
        return None
    plt = _plt()
    n = max(len(cm) for _, cm in panels)
    names = [str(c) for c in class_names] if class_names is not None and len(class_names) == n else None
    ticks = _Ticks(n, names)
    cols = max(1, min(len(panels), int(26 // ticks.panel_in)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        squeeze=False,
        layout="constrained",
        figsize=(cols * ticks.panel_in + 1.2, rows * (ticks.panel_in + 0.4)),
    )
    used = list(axes.flat[: len(panels)])
    for ax in axes.flat[len(panels) :]:
        fig.delaxes(ax)
    for ax, (prefix, cm) in zip(used, panels):
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        _cell_counts(ax, im, cm, ticks.cell_pt)
        acc = np.trace(cm) / max(cm.sum(), 1)
        title = textwrap.fill(label(prefix), width=max(12, int(ticks.panel_in * 11)))
        ax.set_title(f"{title}\nacc {acc:.3f} ({cm.sum():,.0f} rows)", fontsize=10)
        idx = list(range(0, len(cm), ticks.every))
        text = [names[i] if names else str(i) for i in idx]
        ax.set_xticks(idx, text, fontsize=ticks.font, rotation=90 if ticks.rotate else 0)
        ax.set_yticks(idx, text, fontsize=ticks.font)
        ax.tick_params(length=2)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    fig.colorbar(im, ax=used, shrink=0.8, label="share of the true class")
    return fig


class _Ticks:
    """How a class axis fits: the matrix gets a cell size it can be read at (growing with the
    class count up to a bound), the panel adds room for the labels, ticks thin out only when even
    the smallest font would collide."""

    def __init__(self, n: int, names: list[str] | None) -> None:
        matrix_in = min(max(0.22 * n, 3.2), 14.0)
        self.cell_pt = matrix_in * 72 / max(n, 1)
        self.every = max(1, int(np.ceil(6.5 / self.cell_pt)))
        self.font = float(np.clip(0.75 * self.cell_pt * self.every, 5.0, 10.0))
        longest = max((len(t) for t in names), default=0) if names else len(str(n - 1))
        self.rotate = 0.62 * self.font * longest > 0.8 * self.cell_pt * self.every
        label_in = 0.6 * self.font * longest / 72 + 0.5
        self.panel_in = matrix_in + label_in


def _cell_counts(ax: Any, im: Any, cm: np.ndarray, cell_pt: float) -> None:
    """Each cell's count in a font that fits the cell, white on dark cells and black on light
    ones; a large matrix skips zeros (most of its cells) and shortens thousands, or the few
    counts that matter drown."""
    large = len(cm) > 20
    cells = [(i, j, _count(v, large)) for (i, j), v in np.ndenumerate(cm) if v or not large]
    if not cells:
        return
    longest = max(len(t) for _, _, t in cells)
    font = min(10.0, 0.8 * cell_pt, 0.85 * cell_pt / (0.62 * longest))
    if font < 4.0:  # unreadable: the colours alone carry the matrix
        return
    for i, j, t in cells:
        r, g, b, _ = im.cmap(im.norm(im.get_array()[i, j]))
        ink = "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "black"
        ax.text(j, i, t, ha="center", va="center", fontsize=font, color=ink)


def _count(v: float, short: bool) -> str:
    c = int(round(v))
    if not short or c < 1000:
        return str(c)
    unit, size = ("M", 1e6) if c >= 1e6 else ("k", 1e3)
    return f"{c / size:.1f}{unit}" if c / size < 9.95 else f"{c / size:.0f}{unit}"


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
    ax.legend(fontsize=8, loc="best")  # an underconfident model's points sit top left
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
