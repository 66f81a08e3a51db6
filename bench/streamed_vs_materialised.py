"""Epoch time of the streamed distil stage vs the driver-materialised one it replaced (issue 11),
side by side in one process on the same cache, the same student and the same Ray Train loop.

  streamed      kdpipe today: `build_views` joins the source index and every cache part inside Ray
                Data (the driver holds no rows) and materialises the split views in the object store
  materialised  the old path: the driver reads the whole source and cache, joins them with pyarrow,
                prepares the blocks and ships each split with `ray.data.from_arrow`

Both then train the same `fit` (one Ray Train worker, KD on the cached logits), once with the
default `train.keep_in_memory_mb` (small shards replayed from the worker's memory after epoch 0)
and once with 0 (every epoch streamed through Ray Data). Seconds per epoch come from the MLflow
timestamps of `train_loss` (epoch 0 carries the start-up and is left out); the views' build time
and the driver's RSS growth are recorded too.
`python bench/streamed_vs_materialised.py [--rows N] [--epochs E]` writes
bench/results/streamed_vs_materialised.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import big_digits_teacher, digits_parquet, save  # noqa: E402


def driver_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def materialised_views(source: Any, caches: dict[str, Any]) -> dict[str, Any]:
    """The pre-issue-11 distil input: one driver-side join, each split shipped with from_arrow."""
    import pyarrow.compute as pc
    import ray

    from kdpipe.views import prepare_block

    table = source.table
    for tid, cache in caches.items():  # by position (Arrow's hash join refuses fixed-size-list columns)
        part = cache.read()
        rows = part.take(pc.index_in(table["id"], value_set=part["id"]))
        for c in part.column_names[1:]:
            table = table.append_column(f"{tid}.{c}", rows[c])
    table = prepare_block(table)
    return {
        s: ray.data.from_arrow(table.filter(pc.equal(table["split"], s)).drop_columns(["split"]))
        for s in ("train", "val")
    }


def epoch_seconds(uri: str, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    return [(b.timestamp - a.timestamp) / 1000 for a, b in zip(hist, hist[1:])]


def train(cfg: Any, meta: Any, datasets: dict[str, Any], uri: str, label: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from kdpipe.train import Job, fit

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-streamed") or client.get_experiment(
        client.create_experiment("bench-streamed")
    )
    run_id = client.create_run(exp.experiment_id, run_name=label).info.run_id
    losses = [{"name": l.name, "weight": l.weight, **l.params()} for l in cfg.losses]
    fit(
        name=f"bench-{label}",
        datasets=datasets,
        jobs=[Job("student", "train", cfg.student.params, losses, cfg.train.epochs)],
        meta=meta,
        student_kind=cfg.student.kind,
        train_cfg=cfg.train,
        seed=cfg.seed,
        tracking_uri=uri,
        run_id=run_id,
    )
    client.set_terminated(run_id)
    return epoch_seconds(uri, run_id)


def main(rows: int = 200_000, epochs: int = 4, batch: int = 256) -> dict[str, Any]:
    from kdpipe.config import load_spec
    from kdpipe.pipeline import prepare, student_meta, teach
    from kdpipe.views import build_views

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-svm-"))
    big_digits_teacher(tmp / "teacher", [512])
    digits_parquet(tmp / "data" / "rows.parquet", rows)
    cfg = load_spec(
        "pipelines/digits_kd.yaml",
        {
            "source": {
                "kind": "parquet",
                "path": str(tmp / "data"),
                "features": "x",
                "label": "label",
                "num_classes": 10,
                "split": {"val": 0.15, "test": 0.25, "labeled_fraction": 1.0},
            },
            "teachers.0.path": str(tmp / "teacher"),
            "teachers.0.params": {"hidden": [512], "dropout": 0.0},
            "storage": str(tmp),
            "teach.batch_size": 4096,
            "losses": [{"name": "kd", "weight": 1.0, "temperature": 4.0}],
            "student.params": {"hidden": [32]},
            "train.epochs": epochs,
            "train.batch_size": batch,
            "train.lr": 1e-3,
            "train.num_workers": 1,
            "train.checkpoint_every": epochs,
            "evaluate.baseline": False,
            "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        },
    )
    source, uri = prepare(cfg)
    caches = {tid: r.cache for tid, r in teach(cfg, source).items()}

    rss0 = driver_rss_mb()
    t = time.perf_counter()
    views = build_views(source, caches, verify=False)
    streamed_build = time.perf_counter() - t
    rss_streamed = driver_rss_mb() - rss0
    meta = student_meta(cfg, source, views.train)
    rss0 = driver_rss_mb()
    t = time.perf_counter()
    old = materialised_views(source, caches)
    old_build = time.perf_counter() - t
    rss_old = driver_rss_mb() - rss0

    out: dict[str, Any] = {
        "rows": rows,
        "train_rows": views.rows["train"],
        "epochs": epochs,
        "batch_size": batch,
        "num_workers": 1,
        "streamed_views_build_s": streamed_build,
        "materialised_views_build_s": old_build,
        "streamed_driver_rss_growth_mb": rss_streamed,
        "materialised_driver_rss_growth_mb": rss_old,
    }
    # with the default train.keep_in_memory_mb (shards replayed from worker memory after epoch 0) and with 0
    # (every epoch streamed from the object store through Ray Data): the two paths side by side in each
    for keep, tag in ((cfg.train.keep_in_memory_mb, ""), (0, "_every_epoch_streamed")):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"keep_in_memory_mb": keep})})
        streamed = train(c, meta, {"train": views.train, "val": views.val}, uri, f"streamed{tag}")
        materialised = train(c, meta, old, uri, f"materialised{tag}")
        st, m = statistics.median(streamed[1:] or streamed), statistics.median(materialised[1:] or materialised)
        out.update(
            {
                f"streamed_epoch_s{tag}": streamed,
                f"materialised_epoch_s{tag}": materialised,
                f"streamed_median_epoch_s{tag}": st,
                f"materialised_median_epoch_s{tag}": m,
                f"streamed_speed_vs_materialised{tag}": m / st,
            }
        )
        print(
            f"{rows} rows ({views.rows['train']} train), keep_in_memory_mb={keep}: epoch {st:.2f} s streamed vs "
            f"{m:.2f} s materialised -> streamed runs at {m / st:.2f}x"
        )
    print(
        f"views built in {streamed_build:.1f} s vs {old_build:.1f} s; driver RSS +{rss_streamed:.0f} MB vs +{rss_old:.0f} MB"
    )
    save("streamed_vs_materialised", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    main(a.rows, a.epochs)
