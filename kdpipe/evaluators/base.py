"""The evaluator interface, and the metric math more than one evaluator (and the figures) share."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


class Evaluator:
    """Metric math in two halves: `batch_sums` (on the workers) and `finish` (on the driver)."""

    sample_rows: ClassVar[int] = 0  # rows gathered for metrics that need all rows at once (0: none)

    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {}

    def finish(self, sums: dict[str, float], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        raise NotImplementedError


def _correct(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits.argmax(1)[mask] == labels[mask]).sum())


CALIBRATION_BINS = 10


def class_arrays(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-batch sums behind a confusion matrix (`confusion[true, pred]`) and a reliability diagram
    (per confidence bin: rows, summed confidence, correct rows), labeled rows only."""
    c = num_classes
    m = (labels >= 0) & (labels < c) & (pred < c)
    conf, pred, labels = conf[m], pred[m], labels[m]
    confusion = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c).astype(np.float64)
    b = np.minimum((conf * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    hit = (pred == labels).astype(np.float64)
    return {
        "confusion": confusion,
        "calib_n": np.bincount(b, minlength=CALIBRATION_BINS).astype(np.float64),
        "calib_conf": np.bincount(b, weights=conf, minlength=CALIBRATION_BINS),
        "calib_correct": np.bincount(b, weights=hit, minlength=CALIBRATION_BINS),
    }


def expected_calibration_error(a: dict[str, np.ndarray]) -> float:
    """Σ_bins (rows in bin / rows) · |accuracy − mean confidence| (Guo et al., 2017)."""
    n = a["calib_n"]
    if n.sum() == 0:
        return float("nan")
    return float(np.sum(np.abs(a["calib_correct"] - a["calib_conf"])) / n.sum())


def macro_f1(confusion: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur as a label or a prediction (scikit-learn's
    `f1_score(average="macro")`): rare classes count as much as common ones."""
    tp = np.diag(confusion)
    true, pred = confusion.sum(1), confusion.sum(0)
    seen = (true + pred) > 0
    if not seen.any():
        return float("nan")
    f1 = np.divide(2 * tp, true + pred, out=np.zeros_like(tp, dtype=np.float64), where=seen)
    return float(f1[seen].mean())


def scalars(sums: dict[str, Any]) -> dict[str, float]:
    """The scalar sums (metrics); array sums (figure data) are left out."""
    return {k: float(v) for k, v in sums.items() if np.ndim(v) == 0}


def arrays(sums: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in sums.items() if np.ndim(v) > 0}
