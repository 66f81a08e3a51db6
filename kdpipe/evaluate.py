"""Held-out metrics for students, teachers, baselines and champions, computed the same way for all.

An evaluator splits a metric into per-batch *sums* (run where the rows are: Ray Data
`map_batches` over the test split, an actor per worker) and a `finish` step on the driver that
turns the summed counts into metrics. Metrics that need all rows at once (nearest-neighbour
recall) see a bounded *sample* of the split instead (`Evaluator.sample_rows`), and say so in
their docstrings. Only sums and the bounded sample come back to the driver, never the split;
except that a split of at most `IN_DRIVER_BYTES` is scored in the driver, a batch at a time
(an actor's start-up would cost more than its forward passes).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kdpipe.arrays import to_numpy
from kdpipe.evaluators import EVALUATORS
from kdpipe.evaluators.base import arrays, class_arrays, expected_calibration_error, macro_f1
from kdpipe.lm.padding import trim_to_longest
from kdpipe.views import small_materialised

ModelFactory = Callable[[], nn.Module]


def float_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A Ray Data numpy batch as torch tensors; fp16 cache columns widen to fp32 here, per batch,
    so they stay fp16 in the object store and on disk."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            t = torch.from_numpy(np.array(v))  # a copy: Ray's batches are read-only views
            out[k] = t.float() if t.dtype == torch.float16 else t
    return out


SEP = "|"  # between a model's metric prefix and a sum's name in the scored rows


@dataclass
class Scored:
    """Held-out metrics by name, and by metric prefix the array sums its figures draw."""

    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class _BatchScorer:
    """`map_batches` callable: builds every model once per actor and maps a batch to one row of
    sums per model and per teacher, on the whole batch and on each slice's rows (or, in sample
    mode, to the batch's sampled arrays). The sums travel as one JSON column named `sums`
    (`<prefix>|<sum>` keys), so batches that hold no row of some slice still share one schema."""

    def __init__(
        self,
        factories: Any,
        task: str,
        mode: str,
        teachers: list[str],
        num_classes: int,
        slices: dict[str, list[int]] | None = None,
        threads: int | None = 1,
    ) -> None:
        import ray

        if threads:  # an actor of its own; in the driver (`threads=None`) the process's setting stays
            torch.set_num_threads(threads)
        # the factories (student weights: 135 MB for the LM student) come as one object-store ref,
        # fetched here, so Ray Data does not serialise them into the map function itself
        self.models = {prefix: factory().eval() for prefix, factory in ray.get(factories).items()}
        self.ev = EVALUATORS.get(task)()
        self.mode, self.teachers, self.num_classes = mode, teachers, num_classes
        self.slices = {name: np.asarray(ids) for name, ids in (slices or {}).items()}

    def parts(self, batch: dict[str, np.ndarray]) -> Any:
        """(metric-name infix, rows): the whole batch, then each slice's rows where it has any."""
        yield "", batch
        if self.mode == "sample" or not self.slices:
            return
        labels = np.asarray(batch["label"])
        for name, ids in self.slices.items():
            rows = np.isin(labels, ids)
            if rows.any():
                yield f"{name}_", {k: np.asarray(v)[rows] for k, v in batch.items()}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {}
        for infix, part in self.parts(batch):
            tb = float_batch(part)
            for prefix, model in self.models.items():
                mb = trim_to_longest(tb) if getattr(model, "pads_to_longest", False) else tb
                sums = self.ev.sample(model, mb) if self.mode == "sample" else self.ev.batch_sums(model, mb)
                out.update({f"{prefix}{infix}{SEP}{k}": v for k, v in sums.items()})
            if self.mode == "sample":
                return out
            for tid in self.teachers:
                sums = teacher_sums(part, tid, self.num_classes)
                out.update({f"{teacher_prefix(tid)}{infix}{SEP}{k}": v for k, v in sums.items()})
        return {"sums": np.array([json.dumps(out, default=_plain)])}


def _plain(v: Any) -> Any:
    """numpy arrays and scalars as JSON lists and numbers."""
    return np.asarray(v).tolist()


# A materialised split at most this big is scored in the driver, which holds torch and the students
# already: a scoring actor's start-up (a process, ~1.5 s on 2 CPUs) costs more than its forward passes.
IN_DRIVER_BYTES = 32 * 2**20


def evaluate_models(
    task: str,
    factories: dict[str, ModelFactory],
    ds: Any,
    teachers: list[str] | None = None,
    num_classes: int = 0,
    batch_size: int = 256,
    slices: dict[str, list[int]] | None = None,
    in_driver_bytes: int = IN_DRIVER_BYTES,
) -> Scored:
    """Metrics of every model (`{metric prefix: factory}`) and every cached teacher on the Ray
    Dataset `ds`, in one `map_batches` pass (one actor holds all the models: an actor's start-up
    costs more than a small split's forward passes), or, for a materialised split of at most
    `in_driver_bytes`, batch by batch in the driver. Only per-batch sums and a bounded sample
    return to the driver. With `num_classes`, teachers' sums include their confusion and
    calibration arrays. Each of `slices` ({name: label ids}) is also scored on its own rows, as
    `<prefix><name>_<metric>` (metrics that need the bounded sample are left out of slices)."""
    import ray

    ev = EVALUATORS.get(task)()
    teachers = [t for t in teachers or [] if teacher_predictions_available(ds.columns(), t)]
    kwargs = {
        "factories": ray.put(factories),
        "task": task,
        "teachers": teachers,
        "num_classes": num_classes,
        "slices": slices or {},
    }
    in_driver = small_materialised(ds, in_driver_bytes)
    sums: dict[str, dict[str, Any]] = defaultdict(dict)
    for out in scored_batches(ds, {**kwargs, "mode": "sums"}, batch_size, in_driver):
        for row in out["sums"]:  # one small row per input batch
            for key, value in json.loads(row).items():
                prefix, name = key.split(SEP, 1)
                sums[prefix][name] = sums[prefix].get(name, 0.0) + np.asarray(value, np.float64)
    samples: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    if ev.sample_rows and factories:
        outs = list(
            scored_batches(
                ds.limit(ev.sample_rows), {**kwargs, "teachers": [], "mode": "sample"}, batch_size, in_driver
            )
        )
        parts = {k: np.concatenate([o[k] for o in outs])[: ev.sample_rows] for k in outs[0]} if outs else {}
        for key, v in parts.items():
            prefix, name = key.split(SEP, 1)
            samples[prefix][name] = np.asarray(v)
    infixes = [""] + [f"{name}_" for name in slices or {}]
    out = Scored()
    for prefix in factories:
        out.metrics.update(ev.finish(sums.get(prefix, {}), samples.get(prefix, {}), prefix))
        out.arrays[prefix] = arrays(sums.get(prefix, {}))
        for infix in infixes[1:]:
            if sums.get(prefix + infix):
                out.metrics.update(ev.finish(sums[prefix + infix], {}, prefix + infix))
                out.metrics.update(array_metrics(arrays(sums[prefix + infix]), prefix + infix))
    for tid in teachers:
        for infix in infixes:
            t = sums.get(teacher_prefix(tid) + infix, {})
            if t.get("n"):
                out.metrics[f"{teacher_prefix(tid)}{infix}acc"] = float(t["correct"]) / float(t["n"])
                if not infix:
                    out.arrays[teacher_prefix(tid)] = arrays(t)
    for prefix, a in out.arrays.items():
        out.metrics.update(array_metrics(a, prefix))
    return out


def scored_batches(ds: Any, scorer_kwargs: dict[str, Any], batch_size: int, in_driver: bool) -> Any:
    """`_BatchScorer`'s output per batch of `ds`: from one actor (`map_batches`), or computed here."""
    import ray.data

    if in_driver:
        scorer = _BatchScorer(**scorer_kwargs, threads=None)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield scorer(batch)
        return
    scored = ds.map_batches(
        _BatchScorer,
        fn_constructor_kwargs=scorer_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    yield from scored.iter_batches(batch_size=None, batch_format="numpy")


def array_metrics(a: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """The metrics drawn from summed arrays: calibration error and macro-F1 (classifiers)."""
    out = {}
    if "calib_n" in a and a["calib_n"].sum() > 0:
        out[f"{prefix}ece"] = expected_calibration_error(a)
    if "confusion" in a and a["confusion"].sum() > 0:
        out[f"{prefix}macro_f1"] = macro_f1(a["confusion"])
    return out


def evaluate(
    task: str, factory: ModelFactory, ds: Any, prefix: str = "test_", batch_size: int = 256
) -> dict[str, float]:
    """Metrics of the one model `factory` builds on the Ray Dataset `ds` (see `evaluate_models`)."""
    return evaluate_models(task, {prefix: factory}, ds, batch_size=batch_size).metrics


# ------------------------------------------------------------------ teachers, from their cache


def teacher_prefix(tid: str) -> str:
    return f"teacher_{tid}_test_"


def teacher_predictions_available(columns: list[str], tid: str) -> bool:
    return f"{tid}.logits" in columns or f"{tid}.topk_idx" in columns


def teacher_sums(batch: dict[str, np.ndarray], tid: str, num_classes: int) -> dict[str, Any]:
    """A teacher's correct-prediction count on the labeled rows of a batch, from its cached outputs,
    and its confusion/calibration sums (confidence: softmax of dense logits, or top-1 of the top-k
    with the tail bucket)."""
    labels = np.asarray(batch["label"])
    if f"{tid}.logits" in batch:
        z = np.asarray(batch[f"{tid}.logits"], np.float64)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        pred, conf = logp.argmax(1), np.exp(logp.max(1))
    else:
        idx = np.asarray(batch[f"{tid}.topk_idx"])
        val = np.asarray(batch[f"{tid}.topk_val"], np.float64)
        tail = np.asarray(batch[f"{tid}.tail_lse"], np.float64)
        full = np.concatenate([val, tail[:, None]], 1)
        m = full.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(full - m).sum(1))
        pred, conf = idx[:, 0], np.exp(val[:, 0] - lse)
    m = labels >= 0
    sums = {"n": float(m.sum()), "correct": float((pred[m] == labels[m]).sum())}
    return {**sums, **class_arrays(conf, pred, labels, num_classes)} if num_classes else sums


def teacher_accuracy_ds(ds: Any, tid: str) -> float | None:
    """A teacher's accuracy on the labeled rows of `ds`, from its cache columns (`map_batches`)."""
    return evaluate_models("classification", {}, ds, teachers=[tid]).metrics.get(f"{teacher_prefix(tid)}acc")


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
    batch = (
        ds.take_batch(n, batch_format="numpy")
        if not isinstance(ds, pa.Table)
        else {k: to_numpy(ds.slice(0, n)[k]) for k in names}
    )
    return {k: np.ascontiguousarray(np.asarray(batch[k])) for k in names}
