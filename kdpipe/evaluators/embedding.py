"""The `embedding` evaluator (``evaluate.task: embedding``): how well a sentence-encoder student
reproduces its teacher on held-out rows, and how useful its embeddings are on a real task.

Metrics (each under ``prefix``):
  cosine            mean cos(student embedding, cached teacher embedding) of the same row
  recall10          mean |NN10_student ∩ NN10_teacher| / 10: nearest-neighbour agreement among the rows
                    (this and the k-NN metrics: over the first 2,000 rows of the split, a fixed bound)
  knn_acc           leave-one-out, similarity-weighted 10-NN accuracy of the row labels with the
                    student's embeddings (WordNet: the 45 lexicographer categories)
  teacher_knn_acc   the same with the teacher's cached embeddings (the reference)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kdpipe.arrays import to_numpy
from kdpipe.evaluators import EVALUATORS
from kdpipe.evaluators.base import Evaluator

K = 10


def _inputs(student: nn.Module) -> list[str]:
    # a built student has `serving_inputs`; a registered model loaded back (ServedStudent) has `inputs`
    names = getattr(student, "serving_inputs", None) or getattr(student, "inputs", None)
    if not names:
        raise ValueError("the embedding evaluator needs a student with `serving_inputs` (e.g. hf_encoder)")
    return list(names)


def _teacher_column(columns: list[str], inputs: list[str]) -> str:
    tid = inputs[0].split(".", 1)[0] if "." in inputs[0] else None
    if tid and f"{tid}.embedding" in columns:
        return f"{tid}.embedding"
    cands = [c for c in columns if c.endswith(".embedding")]
    if len(cands) != 1:
        raise ValueError(
            f"embedding evaluator: cannot tell which teacher embedding to compare with (found {cands}); "
            "cache the teacher's 'embedding' output"
        )
    return cands[0]


@torch.no_grad()
def student_embeddings(student: nn.Module, table: pa.Table, batch_size: int = 256) -> np.ndarray:
    names = _inputs(student)
    student.eval()
    outs = []
    for i in range(0, table.num_rows, batch_size):
        part = table.slice(i, batch_size)
        batch = {k: torch.from_numpy(np.array(to_numpy(part[k]))) for k in names}
        outs.append(student(batch)["embedding"].float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(e: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def neighbour_recall(s: np.ndarray, t: np.ndarray, k: int = K) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine) under student and teacher embeddings."""
    k = min(k, len(s) - 1)
    if k < 1:
        return float("nan")
    ns, _ = _neighbours(_unit(s), k)
    nt, _ = _neighbours(_unit(t), k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ns.tolist(), nt.tolist())]))


def knn_accuracy(e: np.ndarray, labels: np.ndarray, k: int = K) -> float:
    """Leave-one-out similarity-weighted k-NN label accuracy over the labeled rows."""
    keep = labels >= 0
    e, labels = _unit(e[keep]), labels[keep]
    k = min(k, len(e) - 1)
    if k < 1:
        return float("nan")
    idx, sim = _neighbours(e, k)
    votes = np.zeros((len(e), int(labels.max()) + 1))
    np.add.at(votes, (np.repeat(np.arange(len(e)), k), labels[idx].reshape(-1)), np.maximum(sim, 0).reshape(-1) + 1e-6)
    return float((votes.argmax(1) == labels).mean())


COSINE_BINS = 40


@EVALUATORS.register("embedding")
class EmbeddingEvaluator(Evaluator):
    """`cosine` over every row of the split (summed per batch); `recall10`, `knn_acc` and
    `teacher_knn_acc` compare every row with every other, so they use the first `sample_rows`
    rows of the split (all of it when smaller): the bound keeps the driver's memory and the
    O(n²) similarity matrix fixed however large the split grows."""

    sample_rows = 2000

    def _pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        names = _inputs(model)
        s = model({k: batch[k] for k in names})["embedding"].float().cpu().numpy()
        t = batch[_teacher_column(list(batch), names)].float().cpu().numpy()
        if s.shape != t.shape:
            raise ValueError(
                f"student embeddings {s.shape} and teacher embeddings {t.shape} differ in width; set student `out_dim:`"
            )
        return s, t

    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Summed cosine to the teacher, and its histogram (`cos_hist`, COSINE_BINS over [-1, 1]) for the run's figure."""
        s, t = self._pair(model, batch)
        cos = np.sum(_unit(s) * _unit(t), axis=1)
        return {
            "cosine": float(np.sum(cos)),
            "n": float(len(s)),
            "cos_hist": np.histogram(cos, bins=COSINE_BINS, range=(-1.0, 1.0))[0].astype(np.float64),
        }

    def sample(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        s, t = self._pair(model, batch)
        return {"student": s, "teacher": t, "label": batch["label"].cpu().numpy()}

    def finish(self, sums: dict[str, float], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        res = {f"{prefix}cosine": float(sums["cosine"]) / float(sums["n"]) if sums.get("n") else float("nan")}
        if sample:
            s, t, labels = sample["student"], sample["teacher"], sample["label"]
            res[f"{prefix}recall10"] = neighbour_recall(s, t)
            if (labels >= 0).sum() > 1:
                res[f"{prefix}knn_acc"] = knn_accuracy(s, labels)
                res[f"{prefix}teacher_knn_acc"] = knn_accuracy(t, labels)
        return res
