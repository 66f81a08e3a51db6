"""Shared helpers for the benchmarks: timing, JSON results, the digits teacher."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_env() -> dict[str, str]:
    """This process's environment without Ray's and MLflow's variables, for a benchmark's child
    process: it starts its own embedded Ray and its own MLflow store, as a new user's run does."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}


def results_table(stdout: str) -> str:
    """The results table `kdpipe run` prints last (from its `model ` header line on)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return "\n".join(lines[start:])


def short_commit(ref: str = "HEAD", repo: str | Path | None = None) -> str:
    """`git rev-parse --short` of `ref` in `repo` (default: this checkout)."""
    import subprocess

    repo = repo or Path(__file__).resolve().parent.parent
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", ref], capture_output=True, text=True
    ).stdout.strip()


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Minimum wall time of `repeat` runs (the least disturbed one)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak_gflops(n: int = 1024, repeat: int = 5) -> float:
    """Measured fp32 matmul throughput of this CPU with torch's threads (the physical limit we compare to)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = best_of(lambda: a @ b, repeat)
    return 2 * n**3 / t / 1e9


def epoch_times(tracking_uri: str, run_id: str, metric: str = "train_loss") -> list[float]:
    """Seconds between consecutive epochs of a kdpipe run, from the timestamps of the per-epoch
    metric rank 0 logs (epoch 0, which carries the start-up, has no interval of its own)."""
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, metric), key=lambda m: m.step)
    return [(b.timestamp - a.timestamp) / 1000 for a, b in zip(hist, hist[1:])]


def mean_sd(values: list[float], digits: int) -> str:
    """A table cell: the mean ± the sample standard deviation (n − 1); one value alone, bare."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def bench_store(work: Path, experiment: str) -> dict[str, str]:
    """Spec overrides that keep a results table's caches, checkpoints and MLflow runs under `work`
    (its runs are what the table is read back from, so a stopped table resumes)."""
    return {
        "storage": str(work),
        "tracking.tracking_uri": f"sqlite:///{work / 'mlruns.db'}",
        "tracking.experiment": experiment,
    }


def cached_path_rates(tracking_uri: str, run_id: str, epochs: int) -> dict[str, Any]:
    """kdpipe's cached path, read back from its run: seconds per epoch (MLflow timestamps) and
    train rows per second at the median epoch, one Ray Train worker."""
    import statistics

    from mlflow.tracking import MlflowClient

    epoch_s = epoch_times(tracking_uri, run_id)
    train_rows = int(MlflowClient(tracking_uri).get_run(run_id).data.metrics["rows_train"])
    s = statistics.median(epoch_s)
    return {
        "epochs": epochs,
        "epoch_s": epoch_s,
        "median_epoch_s": s,
        "train_rows": train_rows,
        "rows_per_s": train_rows / s,
        "num_workers": 1,
    }


def write_table(path: str | Path, out: dict[str, Any], keep_earlier: bool = False) -> Path:
    """A results table's JSON. With `keep_earlier` (tables whose rows resume across invocations
    from their MLflow store), what an earlier invocation recorded stays beside this one's, and
    `commands` lists every invocation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_earlier and path.exists():
        before = json.loads(path.read_text())
        out = {**out, "commands": before.get("commands", [before["command"]]) + [out["command"]]}
        out.update({k: v for k, v in before.items() if k not in out})
    path.write_text(json.dumps(out, indent=2, default=str))
    return path


def save(name: str, data: dict[str, Any]) -> Path:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        **data,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": short_commit(),
        "host": platform.node(),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def digits_parquet(path: Path, n: int, row_group: int = 65536) -> Path:
    """n distinct rows built from the real digits images (repetition r shifted by r*1e-4, so
    content ids do not collide) written as a Parquet source file, like a user's data on disk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from kdpipe.arrays import to_fixed_list

    d = load_digits()
    x0, y0 = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([("x", pa.list_(pa.float32(), 64)), ("label", pa.int64())])) as w:
        for lo in range(0, n, row_group):
            idx = np.arange(lo, min(n, lo + row_group))
            x = x0[idx % len(x0)] + (idx // len(x0))[:, None].astype(np.float32) * 1e-4
            w.write_table(pa.table({"x": to_fixed_list(x), "label": pa.array(y0[idx % len(x0)])}))
    return path


def big_digits_teacher(tmp: Path, hidden: list[int]) -> Any:
    """A wide MLP teacher (random init is enough for throughput) saved like `mlp_classifier` saves it."""
    import json as _json

    import torch
    from safetensors.torch import save_file

    from teachers.mlp import build_mlp

    torch.manual_seed(0)
    net = build_mlp(64, hidden, 10, 0.0)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(_json.dumps({"in_dim": 64, "num_classes": 10, "hidden": hidden, "dropout": 0.0}))
    return net
