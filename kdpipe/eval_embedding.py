"""The `embedding` evaluator (``evaluate.task: embedding``): how well a sentence-encoder student
reproduces its teacher on held-out rows, and how useful its embeddings are on a real task.

Metrics (each under ``prefix``):
  cosine            mean cos(student embedding, cached teacher embedding) of the same row
  recall10          mean |NN10_student ∩ NN10_teacher| / 10: nearest-neighbour agreement among the rows
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
from kdpipe.evaluate import EVALUATORS

K = 10


def _inputs(student: nn.Module) -> list[str]:
    # a built student has `serving_inputs`; a registered model loaded back (ServedStudent) has `inputs`
    names = getattr(student, "serving_inputs", None) or getattr(student, "inputs", None)
    if not names:
        raise ValueError("the embedding evaluator needs a student with `serving_inputs` (e.g. small_transformer)")
    return list(names)


def _teacher_column(table: pa.Table, inputs: list[str]) -> str:
    tid = inputs[0].split(".", 1)[0] if "." in inputs[0] else None
    if tid and f"{tid}.embedding" in table.column_names:
        return f"{tid}.embedding"
    cands = [c for c in table.column_names if c.endswith(".embedding")]
    if len(cands) != 1:
        raise ValueError(f"embedding evaluator: cannot tell which teacher embedding to compare with (found {cands}); "
                         "cache the teacher's 'embedding' output")
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


@EVALUATORS.register("embedding")
def embedding_metrics(student: nn.Module, table: pa.Table, prefix: str = "test_") -> dict[str, Any]:
    col = _teacher_column(table, _inputs(student))
    s = student_embeddings(student, table)
    t = to_numpy(table[col], np.float32)
    if s.shape != t.shape:
        raise ValueError(f"student embeddings {s.shape} and teacher '{col}' {t.shape} differ in width; set student `out_dim:`")
    cos = float(np.mean(np.sum(_unit(s) * _unit(t), axis=1)))
    labels = table["label"].to_numpy()
    res = {f"{prefix}cosine": cos, f"{prefix}recall10": neighbour_recall(s, t)}
    if (labels >= 0).sum() > 1:
        res[f"{prefix}knn_acc"] = knn_accuracy(s, labels)
        res[f"{prefix}teacher_knn_acc"] = knn_accuracy(t, labels)
    return res
