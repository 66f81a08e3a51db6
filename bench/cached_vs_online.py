"""Cached vs online distillation: time per epoch of a student trained from cached teacher logits vs
one that runs the teacher every step (same student, data, batch size, optimizer), side by side.

Two measurements in one run:
- the ideal: both loops in one process over in-memory tensors (the bound: nothing but the student's
  step, plus the teacher's forward for the online loop);
- kdpipe's real cached path: the same teacher and student through `kdpipe` (teach stage into the
  Parquet cache, then Ray Data streaming the cache into one Ray Train worker), its epoch time read
  from the per-epoch metric timestamps in MLflow (epochs after the first; each includes the
  validation pass the ideal loop does not run). Rates are train rows per second.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import best_of, big_digits_teacher, cached_path_rates, digits_parquet, save


def main(rows: int = 20_000, hidden: tuple[int, ...] = (2048, 2048), batch: int = 256) -> dict:
    from kdpipe.losses.functional import kd_dense
    from kdpipe.train import make_optimizer
    from students.mlp import MLPStudent
    from teachers.mlp import build_mlp

    torch.manual_seed(0)
    teacher = build_mlp(64, list(hidden), 10, 0.0).eval()
    x = torch.rand(rows, 64)
    with torch.no_grad():
        cached = torch.cat([teacher(x[i : i + 4096]) for i in range(0, rows, 4096)])
    student = MLPStudent(64, 10, [32])
    opt = make_optimizer(student.parameters(), 1e-3)  # what kdpipe's training loop uses

    def epoch(online: bool) -> None:
        for i in range(0, rows, batch):
            xb = x[i : i + batch]
            if online:
                with torch.no_grad():
                    t = teacher(xb)
            else:
                t = cached[i : i + batch]
            loss = kd_dense(student({"x": xb})["logits"], t, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    t_cached = best_of(lambda: epoch(False), 3)
    t_online = best_of(lambda: epoch(True), 3)
    real = real_path(rows, hidden, batch)
    out = {
        "rows": rows,
        "teacher_hidden": list(hidden),
        "student_hidden": [32],
        "batch_size": batch,
        "epoch_s_cached": t_cached,
        "epoch_s_online": t_online,
        "speedup": t_online / t_cached,
        "ideal_rows_per_s": {"cached": rows / t_cached, "online": rows / t_online},
        "kdpipe_cached_path": real,
        "kdpipe_cached_vs_ideal_online": real["rows_per_s"] / (rows / t_online),
        "kdpipe_cached_vs_ideal_cached": real["rows_per_s"] / (rows / t_cached),
    }
    save("cached_vs_online_digits", out)
    print(
        f"digits MLP{list(hidden)} -> MLP[32], {rows} rows: ideal cached {t_cached:.2f} s/epoch, ideal online "
        f"{t_online:.2f} s/epoch -> cache is {t_online / t_cached:.1f}x faster; kdpipe's cached path "
        f"{real['rows_per_s']:,.0f} train rows/s = {out['kdpipe_cached_vs_ideal_online']:.2f}x the ideal online loop, "
        f"{out['kdpipe_cached_vs_ideal_cached']:.2f}x the ideal cached loop"
    )
    return out


def real_path(rows: int, hidden: tuple[int, ...], batch: int, epochs: int = 5) -> dict:
    """kdpipe's cached path end to end on `rows` digits-shaped rows: teach, then `distil` with one
    Ray Train worker; seconds per epoch from the MLflow timestamps of epochs 1.. (epoch 0 carries
    the start-up)."""
    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-cvo-"))
    big_digits_teacher(tmp / "teacher", list(hidden))
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
            "teachers.0.params": {"hidden": list(hidden), "dropout": 0.0},
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
            "tracking.gates.min_gain_over_baseline": None,
        },
    )
    source, uri = prepare(cfg)
    res = distil(cfg, source, teach(cfg, source), uri)
    return cached_path_rates(uri, res.run_id, epochs)


if __name__ == "__main__":
    main()
