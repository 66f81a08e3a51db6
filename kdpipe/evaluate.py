"""Held-out metrics for students, teachers and baselines, computed the same way for all."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kdpipe.arrays import to_numpy
from kdpipe.data import torch_batch
from kdpipe.registry import Registry

# name -> fn(student, table, prefix) -> metrics; chosen by `evaluate.task` in the spec
EVALUATORS: Registry = Registry("evaluator")


@EVALUATORS.register("classification")
@torch.no_grad()
def student_metrics(student: nn.Module, table: pa.Table, prefix: str = "test_") -> dict[str, float]:
    """Accuracy of the final output and of every exit on the labeled rows of `table`."""
    student.eval()
    batch = torch_batch(table)
    out = student(batch)
    labels = batch["label"]
    mask = labels >= 0
    res = {f"{prefix}acc": _acc(out["logits"], labels, mask)}
    for i, z in enumerate(out.get("exits") or []):
        res[f"{prefix}acc_exit{i}"] = _acc(z, labels, mask)
    return res


def _acc(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits.argmax(1)[mask] == labels[mask]).float().mean())


def teacher_accuracy(table: pa.Table, tid: str) -> float | None:
    """Accuracy of a teacher from its cached outputs (dense logits or top-1 of the top-k)."""
    labels = table["label"].to_numpy()
    mask = labels >= 0
    if f"{tid}.logits" in table.column_names:
        pred = to_numpy(table[f"{tid}.logits"]).argmax(1)
    elif f"{tid}.topk_idx" in table.column_names:
        pred = to_numpy(table[f"{tid}.topk_idx"])[:, 0]
    else:
        return None
    return float((pred[mask] == labels[mask]).mean())


def results_table(rows: dict[str, Any], metric: str = "test accuracy") -> str:
    """A small aligned text table: model -> metric."""
    width = max(len(k) for k in rows)
    lines = [f"{'model'.ljust(width)}  {metric}", f"{'-' * width}  {'-' * len(metric)}"]
    for k, v in rows.items():
        lines.append(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")
    return "\n".join(lines)


def serving_example(student: nn.Module, table: pa.Table, n: int = 2) -> dict[str, np.ndarray]:
    """The first rows of the columns the student serves on (its `serving_inputs`, default `x`)."""
    names = getattr(student, "serving_inputs", ["x"])
    return {k: np.array(to_numpy(table.slice(0, n)[k])) for k in names}
from kdpipe import eval_embedding  # noqa: E402,F401  (registers "embedding")
