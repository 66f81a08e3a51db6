"""Held-out metrics for students, teachers, baselines and champions, computed the same way for all.

An evaluator splits a metric into per-batch *sums* (run where the rows are: Ray Data
`map_batches` over the test split, an actor per worker) and a `finish` step on the driver that
turns the summed counts into metrics. Metrics that need all rows at once (nearest-neighbour
recall) see a bounded *sample* of the split instead (`Evaluator.sample_rows`), and say so in
their docstrings. Only sums and the bounded sample come back to the driver, never the split.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kdpipe.arrays import to_numpy
from kdpipe.registry import Registry

ModelFactory = Callable[[], nn.Module]

# name -> Evaluator subclass; chosen by `evaluate.task` in the spec
EVALUATORS: Registry = Registry("evaluator")


class Evaluator:
    """Metric math in two halves: `batch_sums` (on the workers) and `finish` (on the driver)."""

    sample_rows: ClassVar[int] = 0  # rows gathered for metrics that need all rows at once (0: none)

    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {}

    def finish(self, sums: dict[str, float], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        raise NotImplementedError


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
    """Accuracy of the final output and of every exit on the labeled rows."""

    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        out = model(batch)
        labels = batch["label"]
        mask = labels >= 0
        sums = {"n": float(mask.sum()), "acc": _correct(out["logits"], labels, mask)}
        for i, z in enumerate(out.get("exits") or []):
            sums[f"acc_exit{i}"] = _correct(z, labels, mask)
        return sums

    def finish(self, sums: dict[str, float], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        n = sums.get("n", 0.0)
        return {f"{prefix}{k}": (v / n if n else float("nan")) for k, v in sums.items() if k != "n"}


def _correct(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits.argmax(1)[mask] == labels[mask]).sum())


def float_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A Ray Data numpy batch as torch tensors; fp16 cache columns widen to fp32 here, per batch,
    so they stay fp16 in the object store and on disk."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            t = torch.from_numpy(np.array(v))  # a copy: Ray's batches are read-only views
            out[k] = t.float() if t.dtype == torch.float16 else t
    return out


class _BatchScorer:
    """`map_batches` callable: builds the model once per actor, maps a batch to one row of sums
    (or, in sample mode, to the batch's sampled arrays)."""

    def __init__(self, factory: ModelFactory, task: str, mode: str) -> None:
        torch.set_num_threads(1)
        self.model = factory()
        self.model.eval()
        self.ev = EVALUATORS.get(task)()
        self.mode = mode

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tb = float_batch(batch)
        if self.mode == "sample":
            return self.ev.sample(self.model, tb)
        sums = self.ev.batch_sums(self.model, tb)
        return {k: np.array([v], np.float64) for k, v in sums.items()}


def evaluate(task: str, factory: ModelFactory, ds: Any, prefix: str = "test_", batch_size: int = 256) -> dict[str, float]:
    """Metrics of the model `factory` builds on the Ray Dataset `ds`, computed by `map_batches`
    (one actor) with only per-batch sums and a bounded sample returned to the driver."""
    import ray.data

    ev = EVALUATORS.get(task)()
    scored = ds.map_batches(_BatchScorer, fn_constructor_kwargs={"factory": factory, "task": task, "mode": "sums"},
                            batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    sums: dict[str, float] = defaultdict(float)
    for row in scored.iter_rows():  # one small row per batch
        for k, v in row.items():
            sums[k] += float(v)
    sample: dict[str, np.ndarray] = {}
    if ev.sample_rows:
        parts = ds.limit(ev.sample_rows).map_batches(
            _BatchScorer, fn_constructor_kwargs={"factory": factory, "task": task, "mode": "sample"},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1).take_batch(ev.sample_rows, batch_format="numpy")
        sample = {k: np.asarray(v) for k, v in parts.items()}
    return ev.finish(dict(sums), sample, prefix)


# ------------------------------------------------------------------ teachers, from their cache


class _TeacherCounts:
    def __init__(self, tid: str) -> None:
        self.tid = tid

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pred = teacher_predictions(batch, self.tid)
        labels = batch["label"]
        mask = labels >= 0
        return {"n": np.array([mask.sum()], np.float64),
                "correct": np.array([(pred[mask] == labels[mask]).sum() if pred is not None else 0], np.float64)}


def teacher_predictions(batch: dict[str, np.ndarray], tid: str) -> np.ndarray | None:
    """A teacher's predicted class per row from its cached outputs (dense logits or top-1 of the top-k)."""
    if f"{tid}.logits" in batch:
        return np.asarray(batch[f"{tid}.logits"]).argmax(1)
    if f"{tid}.topk_idx" in batch:
        return np.asarray(batch[f"{tid}.topk_idx"])[:, 0]
    return None


def teacher_accuracy_ds(ds: Any, tid: str) -> float | None:
    """A teacher's accuracy on the labeled rows of `ds`, from its cache columns (`map_batches`)."""
    if f"{tid}.logits" not in ds.columns() and f"{tid}.topk_idx" not in ds.columns():
        return None
    n = correct = 0.0
    for row in ds.map_batches(_TeacherCounts, fn_constructor_kwargs={"tid": tid}, batch_format="numpy",
                              compute=_actors()).iter_rows():
        n += float(row["n"])
        correct += float(row["correct"])
    return correct / n if n else None


def _actors() -> Any:
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)


def results_table(rows: dict[str, Any], metric: str = "test accuracy") -> str:
    """A small aligned text table: model -> metric."""
    width = max(len(k) for k in rows)
    lines = [f"{'model'.ljust(width)}  {metric}", f"{'-' * width}  {'-' * len(metric)}"]
    for k, v in rows.items():
        lines.append(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")
    return "\n".join(lines)


def serving_example(student: nn.Module, ds: Any, n: int = 2) -> dict[str, np.ndarray]:
    """The first rows of the columns the student serves on (its `serving_inputs`, default `x`)."""
    names = list(getattr(student, "serving_inputs", ["x"]))
    batch = ds.take_batch(n, batch_format="numpy") if not isinstance(ds, pa.Table) else \
        {k: to_numpy(ds.slice(0, n)[k]) for k in names}
    return {k: np.ascontiguousarray(np.asarray(batch[k])) for k in names}


from kdpipe import eval_embedding, eval_lm  # noqa: E402,F401  (register "embedding", "lm")
