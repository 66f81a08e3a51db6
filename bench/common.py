"""Shared helpers for the benchmarks: timing, JSON results, the digits teacher."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


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


def save(name: str, data: dict[str, Any]) -> Path:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads()}, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def digits_rows(n: int):
    """n real digits rows (the 1,797 images repeated) as the source table the teach stage reads."""
    import numpy as np
    import pyarrow as pa

    from kdpipe.arrays import to_fixed_list
    from kdpipe.config import SourceConfig
    from kdpipe.sources import load_source

    src = load_source(SourceConfig(kind="sklearn_digits"))
    reps = -(-n // src.table.num_rows)
    t = pa.concat_tables([src.table] * reps).slice(0, n)
    ids = pa.array([f"{i:020d}" for i in range(n)])  # unique ids so nothing is deduplicated
    t = t.set_column(0, "id", ids)
    _ = (np, to_fixed_list)
    return src, t


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
